"""Per mount: the real-time ``mount`` feeder, the ffmpeg ``encoder``, the libshout ``icecast`` connection (and
format tables); ``local``: the embedded Icecast. Knows nothing of MusicGen."""

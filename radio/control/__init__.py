"""Side doors: the HTTP ``api`` (status, control, Prometheus metrics, the web player in ``static/``). Changes it
asks for reach stations as engine commands, never directly."""

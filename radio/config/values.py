"""The configuration's value types: frozen dataclasses for stations and the daemon, the value types the other
layers share (sampling settings, dtype and decoder names, the default model), and the limits every check uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL = "facebook/musicgen-small"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DECODERS = ("auto", "static", "dynamic")
GENERATE = ("listened", "always")  # engine.generate: which stations the model serves
WEIGHTS = ("auto", "float32", "bfloat16", "int8", "int4")  # how the decoder's linear weights are held
KV_FORMATS = ("auto", "full", "8bit")  # how the dynamic path's KV cache is held
COMPILE = ("auto", "always", "never")  # whether the CPU decode step's layer is compiled (musicgen/compiled.py)
CODEC = ("auto", "float32", "bfloat16")  # the dtype EnCodec turns codes into audio in (musicgen/codec.py)
KERNELS = ("auto", "torch")  # the CPU kernels of 8/4-bit weights and an 8-bit cache (musicgen/native)


@dataclass(frozen=True)
class Sampling:
    """Per-station sampling settings; applied per batch row."""

    temperature: float = 1.0
    top_k: int = 250
    guidance: float = 3.0


FORMATS = ("mp3", "vorbis", "opus")
ORDERS = ("cycle", "shuffle")
BITRATES = {"mp3": (32, 320), "vorbis": (48, 500), "opus": (16, 256)}
PASSWORD_ENV = "RADIO_SOURCE_PASSWORD"
API_TOKEN_ENV = "RADIO_API_TOKEN"

# Limits that keep a hostile or broken file from hurting the process.
MAX_FILE_BYTES = 256 * 1024
MAX_NODES = 20_000
MAX_DEPTH = 20
MAX_PROMPT_CHARS = 1000
MAX_STRING_CHARS = 2000
MAX_PLAYLIST_ITEMS = 1000
MAX_STATIONS = 512  # one GPU carries about a hundred small-model mounts; a CPU far fewer (see README)
MAX_DURATION_S = 24 * 3600.0
MAX_TITLE_CHARS = 200
MAX_BLEND_S = 600.0


@dataclass(frozen=True)
class PlaylistItem:
    title: str
    prompt: str
    duration: float  # seconds
    blend: float = 0.0  # seconds over which the text conditioning moves from the previous item's prompt


MAX_REQUEST_CHARS = 300  # a listener's prompt
MAX_REQUEST_NAME_CHARS = 40
MAX_BLOCKLIST_LINES = 10_000


@dataclass(frozen=True)
class RequestsConfig:
    """Listener requests of one station (the daemon's ``requests:`` is every station's default). Off unless
    enabled."""

    enabled: bool = False
    every: float = 600.0  # seconds a listener waits between requests (the cooldown)
    queue: int = 5  # requests waiting at most
    duration: float = 120.0  # seconds a request plays
    share: float = 0.5  # at most this fraction of airtime is requests: the programme keeps its place
    blocklist: tuple[str, ...] = ()  # regular expressions (words become whole-word patterns); any match refuses
    blocklist_file: str = ""  # where they came from (for status)


REQUESTS_KEYS = tuple(f for f in RequestsConfig.__dataclass_fields__ if f != "blocklist_file")


@dataclass(frozen=True)
class StationConfig:
    """One station, as validated from one YAML file."""

    name: str
    mount: str
    format: str
    bitrate: int
    description: str
    genre: str
    url: str
    order: str
    sampling: Sampling
    playlist: tuple[PlaylistItem, ...]
    path: str = ""
    apply: str = "next"  # live edits of the playlist: "next" (at the end of the current item) or "now"
    loudness: float | None = -16.0  # LUFS target of the mount's encoder; None: no normalisation
    idents: tuple[str, ...] = ()  # audio files (absolute paths) played between playlist items
    ident_every: int = 1  # ...every this many items
    model: str | None = None  # hub id or checkpoint directory; None: the daemon's model
    dtype: str | None = None  # decoder dtype for this station's model; None: the daemon's dtype
    weights: str | None = None  # decoder weights for this station's model; None: the daemon's engine.weights
    always: bool = False  # generate even while nobody listens (engine.generate: listened leaves it alone)
    requests: tuple[tuple[str, Any], ...] = ()  # keys of its ``requests:`` section over the daemon's defaults

    def requests_config(self, defaults: "RequestsConfig") -> "RequestsConfig":
        """This station's request settings: its own ``requests:`` keys over the daemon's."""
        from dataclasses import replace

        return replace(defaults, **dict(self.requests))

    @property
    def key(self) -> str:
        """Stations are identified by their file."""
        return self.path or self.mount


@dataclass(frozen=True)
class IcecastConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    user: str = "source"
    password: str = field(default="", repr=False)
    local: bool = False  # start our own icecast2 from icecast.xml
    admin_password: str = field(default="", repr=False)
    public_url: str = ""  # where listeners reach Icecast (web player links); default http://host:port

    @property
    def listen_base(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


@dataclass(frozen=True)
class ApiConfig:
    """The control API and web player."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8765
    token: str = field(default="", repr=False)  # required for writes when set; required to bind non-loopback

    @property
    def loopback(self) -> bool:
        return self.host in ("localhost", "::1") or self.host.startswith("127.")

    def token_problem(self) -> str | None:
        """Why this API setting is refused (a non-loopback bind without a token), or None."""
        if self.enabled and not self.loopback and not self.token:
            return (f"{self.host} is not loopback: set ${API_TOKEN_ENV} or api.token_file, so that writes "
                    "need a token")
        return None


@dataclass(frozen=True)
class EngineConfig:
    """Engine timing. Seconds unless named otherwise."""

    chunk_seconds: float = 4.0  # new audio per batched step in steady state
    first_chunk_seconds: float = 1.0  # a new station's first step: short, so it is on air quickly
    context_seconds: float = 10.0  # codes kept per station; what a window reset re-prefills
    window_seconds: float = 30.0  # longest context a station's KV cache grows to before a reset
    buffer_seconds: float = 12.0  # PCM a station tries to keep ahead of real time
    max_batch: int = 0  # stations per step at most; 0: the model's own limit (16 on CPU, every slot that fits on CUDA)
    overlap_frames: int = 10  # context frames decoded again in front of a chunk, to warm EnCodec up
    crossfade_ms: float = 40.0  # equal-power crossfade at chunk joins (taken from the overlap)
    filler_seconds: float = 4.0  # recent audio looped when a station's buffer runs dry
    silence_seconds: float = 10.0  # generated near-silence (< -60 dBFS) longer than this is skipped
    decoder: str = "auto"  # decode path: auto (static slots + CUDA graphs on CUDA, dynamic on CPU), static, dynamic
    generate: str = "listened"  # listened: only stations with listeners (and `always: true` ones); always: every one
    weights: str = "auto"  # decoder weights: auto (int8 on a bf16 CPU, else dense), float32, bfloat16, int8, int4
    kv: str = "auto"  # KV cache of the dynamic (CPU) path: auto (8bit on a bf16 CPU with radio's kernels), full, 8bit
    compile: str = "auto"  # the CPU step's layer compiled: auto (bf16 and quantized weights), always, never
    codec: str = "auto"  # EnCodec's dtype: auto (bf16 where the CPU decoder runs in bf16 and a probe agrees), ...
    kernels: str = "auto"  # CPU kernels: auto (radio's own where they build and check: AVX-512 VNNI), torch
    linger: float = 60.0  # a station keeps generating this long after its last listener left (zapping)


@dataclass(frozen=True)
class DaemonConfig:
    stations_dir: str = "stations"
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    memory_budget: str = "auto"  # for all models together: a size (6GiB), auto, or off
    seed: int | None = None
    icecast: IcecastConfig = field(default_factory=IcecastConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    log_level: str = "INFO"
    path: str = ""
    requests: RequestsConfig = field(default_factory=RequestsConfig)  # every station's default

"""A local proxy arm: stands in for vllm-p2p-proxy / vllm-fs-proxy, speaking the OpenAI-compatible
API the runbook uses.

- `POST /v1/completions`, `POST /v1/chat/completions` (with or without `"stream": true`, then as
  server-sent events ending in `data: [DONE]`): the completion `id` carries the P/D path the real
  proxies put there, `cmpl-___prefill_addr_<prefill>___decode_addr_<decode>_<uuid>`, so the
  runbook's Step 1 can tell the arms apart.
- `GET /v1/models`, and `GET /metrics` with vLLM-style gauges (`vllm:num_requests_running`, ...),
  answered with `metrics_status` (set it to 404 to stage the runbook's failure signal 2).
- A P/D timing model (`PdModel`): before the first token, prefill (a fixed part plus a part per
  prompt token) and the KV-cache transfer from prefill to decode (the prompt's KV bytes at the arm's
  bandwidth, plus a fixed overhead), plus an extra fixed `delay` and a uniform `jitter`; then tokens
  stream at an inter-token latency with jitter and a heavy-ish tail. With the defaults the arms are
  alike at short prompts (128 tokens: ~2 % apart) and differ at long ones (8192 tokens: ~30 %), so an
  A/B experiment has something real to find, and only where the KV transfer matters.
- Under load, as the backends: each arm has one transfer link (`Link`) whose bandwidth the transfers in
  progress share equally, so n concurrent transfers each take n times as long; prefill, the overhead and
  the extra delay are plain waits that do not queue. The knee of the FS arm comes from its link: at
  8192 tokens a transfer holds 20 GB/s for 40 ms, so the link saturates at ~25 transfers/s (NVLink's
  at ~250/s), and past it the FS arm's first tokens grow with the load while NVLink's barely move.
  `kvablocal.loadmodel.predict_ttft` computes each arm's mean time to first token at a concurrency.
  The waits are sleeps and the link's waiters wait on conditions, so the arm spends CPU only on the HTTP
  (2-3 ms a completion of 8192 words): its means stayed within 7 % of the model up to 256 requests in
  flight (measured, the FS link saturated, ~12 % of a core).
- Faults, as a troubled backend behind the gateway shows them: `fail_fraction` of the completions are
  answered `503` at once (vLLM's error JSON, `x-served-by` as every answer, so the gateway tags it with
  the arm like any other response), and `stall_fraction` of the others have the waits before their
  first token (prefill, the transfer overhead, `delay` and `jitter`: all but the link's transfer)
  multiplied by `stall_factor` (a slow filesystem, a congested link).
  Which requests fail or stall is drawn from the arm's own generator, seeded by `seed` and the arm's
  name: two draws per completion in the order they arrive, so the same seed and the same number of
  requests give the same failures and stalls (`failed` and `stalled` count them).
- A prefix cache per arm (`PrefixCache`), as vLLM's automatic prefix caching: the prompt's words cut into
  blocks of 16 (vLLM's default block size; a last partial block is never cached), each block known by a
  hash chained on its parent's, so that a block matches only after the same whole prefix. A request's
  cached prefix is its longest run of leading blocks in the cache (short of its last token, which vLLM
  always computes); then all its full blocks go in, the least recently used evicted past
  `prefix_cache_tokens` (a prompt's tail blocks before its head, as vLLM frees them). The prefill skips the
  cached tokens; the transfer does not: the decode side gets the whole prompt's KV through the link. That
  is the FS arm's case: its cache is the shared storage, large (4,194,304 tokens, ~412 GB of KV), the
  decode reads every block from it (its loads pay its bandwidth), but the prefill is saved. The NVLink
  arm's cache is the prefill GPU's memory, small (131,072 tokens, ~12.9 GB: what a 30B bf16 model leaves
  of an 80 GB GPU, roughly), and its transfer is cheap anyway. `prefix_cache_tokens=0` turns it off.
  A request looks up and fills the cache when it arrives (a real one fills it as its prefill ends), and a
  failed one (503) touches nothing. `/metrics` counts vLLM's `vllm:prefix_cache_queries_total` and
  `vllm:prefix_cache_hits_total` (tokens); `cache_queries` and `cache_hits` are the same counts.
- Prompt tokens are counted as whitespace-separated words (the prompt, or every message's text), and
  reported in `usage`; a streamed request with `stream_options.include_usage` gets vLLM's last chunk
  (`"choices": []` and `usage`) before `data: [DONE]`.

Every JSON answer also names the arm (`arm`) and echoes the request headers (`headers`), and every
response carries `x-served-by: <arm>`, so tests can see what the gateway forwarded.
"""

import argparse
import json
import random
import threading
import time
import uuid
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "Qwen/Qwen3-Coder-30B-A3B-Instruct"

# The runbook's expected id paths (its Step 1).
DEFAULT_PATHS = {
    "nvlink": ("vllm-prefill-p2p:14579", "vllm-decode-p2p:14579"),
    "fs": ("vllm-prefill-fs", "vllm-decode-fs"),
}

WORDS = "the quick brown fox jumps over the lazy dog".split()
# Answers are at most this many tokens long, whatever max_tokens asks.
MAX_ANSWER_TOKENS = 64

# KV-cache bytes per prompt token of the runbook's model, Qwen/Qwen3-Coder-30B-A3B-Instruct (its
# config.json on Hugging Face: num_hidden_layers 48, num_key_value_heads 4, head_dim 128; bf16):
# K and V × 48 layers × 4 heads × 128 × 2 bytes = 98,304 bytes.
KV_BYTES_PER_TOKEN = 2 * 48 * 4 * 128 * 2

# Effective KV-transfer bandwidth per arm, bytes/s. NVLink P2P moves hundreds of GB/s between GPUs of a
# node; a filesystem connector goes through page cache and NVMe at a few to tens of GB/s.
BANDWIDTH = {"nvlink": 200e9, "fs": 20e9}
DEFAULT_BANDWIDTH = 200e9

# vLLM's default KV-cache block size, tokens: the unit its prefix cache hashes, matches and evicts.
BLOCK_TOKENS = 16
# Prefix-cache capacity per arm, tokens. NVLink: the prefill GPU's free KV memory, ~12.9 GB at 98,304
# bytes a token (an 80 GB GPU less a 30B bf16 model's weights and the runtime, roughly); FS: the shared
# storage the connector writes every block to, ~412 GB.
PREFIX_CACHE_TOKENS = {"nvlink": 131_072, "fs": 4_194_304}
DEFAULT_PREFIX_CACHE_TOKENS = 131_072


class PrefixCache:
    """An LRU cache of KV blocks keyed as vLLM's automatic prefix caching keys them (vllm/v1/core:
    kv_cache_utils.py's chained block hashes, kv_cache_manager.py's get_computed_blocks and free). The
    capacity is in tokens (whole blocks of `block_tokens`); 0 turns the cache off: nothing is looked up,
    cached or counted, as vLLM without prefix caching. Thread-safe (one lock, O(blocks) a query).

    A block's key is Python's built-in hash of (its parent's key, its words): fast, the same within the
    process (the only one that reads it) but not across processes (string hashing is salted per process);
    64 bits, so a false match is as unlikely as vLLM's own (it hashes with SHA-256 or the built-in hash).
    """

    def __init__(self, capacity_tokens: int, block_tokens: int = BLOCK_TOKENS):
        if not capacity_tokens >= 0:
            raise ValueError(f"prefix_cache_tokens is 0 or more, not {capacity_tokens}")
        if block_tokens < 1:
            raise ValueError(f"block_tokens is 1 or more, not {block_tokens}")
        self.capacity_tokens = int(capacity_tokens)
        self.block_tokens = int(block_tokens)
        self.capacity_blocks = self.capacity_tokens // self.block_tokens
        self._blocks = OrderedDict()  # block key -> None, least recently used first
        self._lock = threading.Lock()
        self.queries = 0  # prompt tokens looked up (vllm:prefix_cache_queries)
        self.hits = 0  # of them found cached (vllm:prefix_cache_hits)

    def __len__(self) -> int:
        with self._lock:
            return len(self._blocks)

    def counts(self) -> tuple:
        """(queries, hits), tokens, read together."""
        with self._lock:
            return self.queries, self.hits

    def block_keys(self, words: list) -> list:
        """The keys of the full blocks of `words`, in order, each chained on the one before."""
        keys, parent, size = [], None, self.block_tokens
        for start in range(0, len(words) - size + 1, size):
            parent = hash((parent, tuple(words[start:start + size])))
            keys.append(parent)
        return keys

    def query(self, words: list, tokens: int = None) -> int:
        """The cached tokens of a prompt of `words` (counted as `tokens`, default their number), then
        caches its full blocks. The hit is the longest run of leading blocks in the cache, short of the
        prompt's last token (vLLM computes it for the logits: max_cache_hit_length = num_tokens - 1). The
        prompt's blocks are then used most recently, its first block last (vLLM frees a request's blocks
        in reverse order, "so that the tail blocks are evicted first"), and the least recently used blocks
        go while over capacity."""
        tokens = len(words) if tokens is None else tokens
        if self.capacity_tokens == 0:
            return 0
        keys = self.block_keys(words)
        limit = max(0, tokens - 1) // self.block_tokens
        with self._lock:
            blocks, hit = self._blocks, 0
            for key in keys[:limit]:
                if key not in blocks:
                    break
                hit += 1
            for key in reversed(keys):
                blocks[key] = None
                blocks.move_to_end(key)
            while len(blocks) > self.capacity_blocks:
                blocks.popitem(last=False)
            self.queries += tokens
            self.hits += hit * self.block_tokens
        return hit * self.block_tokens


class Link:
    """A transfer link of `bandwidth` bytes/s, shared equally by the transfers in progress (processor
    sharing): with n in progress each moves at bandwidth / n, so one alone takes bytes / bandwidth and two
    equal ones started together both take twice that. Thread-safe; `transfer` blocks its caller.

    One lock guards the remaining bytes of every transfer in progress and the time they were last
    advanced. Whoever holds it advances them to now, event by event (a transfer that finished stops
    taking its share at its own finish time, not when its thread wakes), so the waiters' wake-up latency
    never slows the others. A waiter then waits on its own condition (of that lock) until its finish at
    the current share, and loops. An arrival wakes nobody: it only makes the others later, and a waiter
    that wakes early recomputes and waits again. A finish raises the others' shares, but as all move at
    the same rate they finish in the order of their remaining bytes: it wakes only the next to finish
    (and any that finished with it). Waking them all instead (one condition, `notify_all`) costs O(n²)
    per finish under the lock and the GIL: at 256 requests in flight on the FS link that held up the
    NVLink arm's first tokens by 50 % (measured).
    """

    def __init__(self, bandwidth: float):
        if not bandwidth > 0:
            raise ValueError(f"bandwidth is bytes/s above 0, not {bandwidth}")
        self.bandwidth = float(bandwidth)
        self._lock = threading.Lock()
        # transfer -> [bytes still to move (0: finished, its thread not yet back), its condition]
        self._transfers = {}
        self._advanced = time.monotonic()
        self.transfers = 0  # finished
        self.peak = 0  # most transfers in progress at once

    @property
    def active(self) -> int:
        with self._lock:
            return self._moving()

    def _moving(self) -> int:
        return sum(1 for left, _ in self._transfers.values() if left > 0)

    def _advance(self, now: float):
        """Moves every transfer in progress on to `now` (the lock held)."""
        elapsed, self._advanced = now - self._advanced, now
        while elapsed > 0:
            moving = [entry for entry in self._transfers.values() if entry[0] > 0]
            if not moving:
                return
            share = self.bandwidth / len(moving)
            step = min(elapsed, min(entry[0] for entry in moving) / share)
            for entry in moving:
                left = entry[0] - step * share
                # Rounding: what is left of a finished transfer is within 0.1 µs of the link's bytes.
                entry[0] = left if left > self.bandwidth * 1e-7 else 0.0
            elapsed -= step

    def transfer(self, nbytes: float) -> float:
        """Blocks until `nbytes` are through the link; returns the seconds it took."""
        started = time.monotonic()
        if nbytes <= 0:
            return 0.0
        key, mine = object(), [float(nbytes), threading.Condition(self._lock)]
        with self._lock:
            self._advance(time.monotonic())
            self._transfers[key] = mine
            self.peak = max(self.peak, self._moving())
            while True:
                self._advance(time.monotonic())
                if mine[0] <= 0:
                    del self._transfers[key]
                    self.transfers += 1
                    moving = [entry for entry in self._transfers.values() if entry[0] > 0]
                    for entry in self._transfers.values():
                        if entry[0] <= 0:
                            entry[1].notify()
                    if moving:
                        min(moving, key=lambda entry: entry[0])[1].notify()
                    return time.monotonic() - started
                mine[1].wait(mine[0] * self._moving() / self.bandwidth)


class PdModel:
    """The time of a disaggregated request, in seconds. Defaults: 30 ms + 0.01 ms per prompt token of
    prefill (per token not in the prefix cache), 2 ms transfer overhead, 2 ms between tokens (±25 %), and
    2 % of the gaps 5-10 times longer. `first_token` is the unloaded time (the transfer alone on the link);
    an arm waits `prefill` plus `transfer_overhead`, then moves `kv_bytes` (all the prompt's) through its
    shared `Link`."""

    def __init__(self, bandwidth: float, prefill_base: float = 0.030, prefill_per_token: float = 0.00001,
                 transfer_overhead: float = 0.002, itl: float = 0.002, itl_jitter: float = 0.25,
                 tail_probability: float = 0.02, tail_factor: tuple = (5.0, 10.0)):
        self.bandwidth = bandwidth
        self.prefill_base = prefill_base
        self.prefill_per_token = prefill_per_token
        self.transfer_overhead = transfer_overhead
        self.itl = itl
        self.itl_jitter = itl_jitter
        self.tail_probability = tail_probability
        self.tail_factor = tail_factor

    def prefill(self, prompt_tokens: int, cached_tokens: float = 0) -> float:
        return self.prefill_base + self.prefill_per_token * (prompt_tokens - cached_tokens)

    @staticmethod
    def kv_bytes(prompt_tokens: int) -> int:
        return KV_BYTES_PER_TOKEN * prompt_tokens

    def first_token(self, prompt_tokens: int, cached_tokens: float = 0) -> float:
        """Unloaded: prefill, the transfer overhead and the KV bytes at the whole bandwidth."""
        transfer = self.transfer_overhead + self.kv_bytes(prompt_tokens) / self.bandwidth
        return self.prefill(prompt_tokens, cached_tokens) + transfer

    def gap(self) -> float:
        gap = self.itl * random.uniform(1 - self.itl_jitter, 1 + self.itl_jitter)
        if random.random() < self.tail_probability:
            gap *= random.uniform(*self.tail_factor)
        return gap


def prompt_words(body: dict) -> list:
    """The whitespace-separated words of the prompt (string or list) or of every message's text, in order."""
    def words(value) -> list:
        if isinstance(value, str):
            return value.split()
        if isinstance(value, list):
            return [w for part in value for w in words(part.get("text") if isinstance(part, dict) else part)]
        return []

    if "messages" in body and isinstance(body["messages"], list):
        return [w for m in body["messages"] if isinstance(m, dict) for w in words(m.get("content"))]
    return words(body.get("prompt"))


def prompt_tokens(body: dict) -> int:
    """The prompt's words (`prompt_words`), counted; at least 1."""
    return max(1, len(prompt_words(body)))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kvab-local-arm"
    # Headers and body go out in separate writes; with Nagle on, the body waits for the peer's
    # delayed ACK (~40 ms), which would swamp the arms' configured delays.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def _read_json(self):
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            return None

    def _send(self, status, body: bytes, content_type="application/json", extra=()):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-served-by", self.server.arm_name)
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status, obj):
        obj = {**obj, "arm": self.server.arm_name, "headers": [[k.lower(), v] for k, v in self.headers.items()]}
        self._send(status, json.dumps(obj).encode())

    def do_GET(self):
        self.server.count_request(self.command, self.path)
        if self.path == "/metrics":
            status = self.server.metrics_status
            body = self.server.metrics_text().encode() if status == 200 else b"404 page not found\n"
            self._send(status, body, "text/plain; version=0.0.4")
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.model, "object": "model", "owned_by": "vllm"}]})
        else:
            self._json(200, {"method": self.command, "path": self.path})

    def do_POST(self):
        self.server.count_request(self.command, self.path)
        body = self._read_json()
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            self._json(200, {"method": self.command, "path": self.path})
            return
        if not isinstance(body, dict):
            self._json(400, {"error": {"message": "request body is not a JSON object", "type": "BadRequestError", "code": 400}})
            return
        if self.server.drop:
            status, reason = self.server.drop
            code = "ResourceExhausted" if status == 429 else "ServiceUnavailable"
            self._send(status, f"inference error: {code} - dropped by flow control".encode(), "text/plain",
                       extra=[("x-llm-d-request-dropped-reason", reason)])
            return
        fail, stall = self.server.draw_faults()
        if fail:
            self._json(503, {"object": "error", "message": "the KV-cache transfer failed", "type": "ServiceUnavailableError",
                             "param": None, "code": 503})
            return
        chat = self.path == "/v1/chat/completions"
        tokens = max(1, min(int(body.get("max_tokens") or 16), MAX_ANSWER_TOKENS))
        words = prompt_words(body)
        prompt = max(1, len(words))
        cached = self.server.prefix_cache.query(words, prompt)
        started = time.monotonic()
        with self.server.running():
            # Prefill of the tokens not cached (and the overhead, the extra delay), then the KV-cache
            # transfer of the whole prompt to the decode pod through the arm's link, shared with the
            # transfers in progress. A stall multiplies the wait only.
            wait, kv_bytes = self.server.first_token_parts(prompt, cached)
            time.sleep(wait * (self.server.stall_factor if stall else 1.0))
            self.server.transfer(kv_bytes)
            ttft = time.monotonic() - started
            words = [random.choice(WORDS) for _ in range(tokens)]
            gaps = [self.server.model_timing.gap() for _ in range(tokens - 1)]
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                self._stream(chat, words, gaps, prompt, include_usage)
            else:
                time.sleep(sum(gaps))
                self._json(200, self.server.completion(chat, words, prompt))
        self.server.observe(ttft, gaps, time.monotonic() - started)

    do_PUT = do_DELETE = do_POST

    def _stream(self, chat, words, gaps, prompt, include_usage):
        """Server-sent events, one chunk per token, as vLLM sends them."""
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("x-served-by", self.server.arm_name)
        self.end_headers()
        completion_id = self.server.completion_id(chat)

        def chunk(data: str):
            payload = f"data: {data}\n\n".encode()
            self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            self.wfile.flush()

        kind = "chat.completion.chunk" if chat else "text_completion"
        for i, word in enumerate(words):
            if i:
                time.sleep(gaps[i - 1])
            piece = (" " if i else "") + word
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            choice["finish_reason"] = "length" if i == len(words) - 1 else None
            chunk(json.dumps({"id": completion_id, "object": kind, "created": int(time.time()),
                              "model": self.server.model, "choices": [choice]}))
        if include_usage:
            # vLLM's (and OpenAI's) usage chunk: the last before [DONE], with no choices.
            chunk(json.dumps({"id": completion_id, "object": kind, "created": int(time.time()), "model": self.server.model,
                              "choices": [], "usage": usage(prompt, len(words))}))
        chunk("[DONE]")
        self.wfile.write(b"0\r\n\r\n")


# vLLM's bucket bounds, seconds (vllm/v1/metrics: time_to_first_token, inter_token_latency, request_latency).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count), as vLLM exports its latencies."""

    def __init__(self, name: str, help_text: str, bounds: tuple):
        self.name, self.help, self.bounds = name, help_text, bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float):
        self.counts[next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))] += 1
        self.sum += value

    def text(self, labels: str) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip((*self.bounds, "+Inf"), self.counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        lines += [f"{self.name}_sum{{{labels}}} {self.sum}", f"{self.name}_count{{{labels}}} {cumulative}"]
        return "\n".join(lines) + "\n"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ArmServer(ThreadingHTTPServer):
    daemon_threads = True
    # Envoy opens a connection per concurrent request (each of its workers its own): the default backlog (5)
    # overflows under a burst, the SYN is retried after 1 s, and the gateway's 1 s connect_timeout answers
    # 503 (tests/test_loop.py's 4000-request burst at concurrency 32 met it on a busy machine).
    request_queue_size = 128

    def __init__(self, name: str, port: int = 0, prefill: str = None, decode: str = None, delay: float = 0.0,
                 jitter: float = 0.0, metrics_status: int = 200, model: str = MODEL, bandwidth: float = None,
                 pd_model: dict = None, drop: tuple = None, fail_fraction: float = 0.0, stall_fraction: float = 0.0,
                 stall_factor: float = 1.0, seed: int = 0, shared_link: bool = True, prefix_cache_tokens: int = None):
        for knob, value in (("fail_fraction", fail_fraction), ("stall_fraction", stall_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{knob} is a fraction in [0, 1], not {value}")
        if stall_factor < 0:
            raise ValueError(f"stall_factor is a factor of 0 or more, not {stall_factor}")
        # None: the arm's default by its name (PREFIX_CACHE_TOKENS); 0: no prefix cache.
        if prefix_cache_tokens is None:
            prefix_cache_tokens = PREFIX_CACHE_TOKENS.get(name, DEFAULT_PREFIX_CACHE_TOKENS)
        self.prefix_cache = PrefixCache(prefix_cache_tokens)
        super().__init__(("127.0.0.1", port), _Handler)
        self.arm_name = name
        # (status, reason): every completion is answered as llm-d-router's EPP answers a request its flow
        # control dropped (status, x-llm-d-request-dropped-reason, "inference error: CODE - message" body;
        # v0.10.0 pkg/common/error/error.go), standing in for the EPP, which does not run locally.
        self.drop = drop
        default_prefill, default_decode = DEFAULT_PATHS.get(name, (f"vllm-prefill-{name}", f"vllm-decode-{name}"))
        self.prefill = prefill or default_prefill
        self.decode = decode or default_decode
        self.delay = delay
        self.jitter = jitter
        self.model_timing = PdModel(bandwidth or BANDWIDTH.get(name, DEFAULT_BANDWIDTH), **(pd_model or {}))
        # The KV-transfer link the arm's transfers share; without it (shared_link=False) every transfer
        # has the whole bandwidth, the unloaded model at any load.
        self.link = Link(self.model_timing.bandwidth) if shared_link else None
        self.metrics_status = metrics_status
        self.model = model
        self.fail_fraction = fail_fraction
        self.stall_fraction = stall_fraction
        self.stall_factor = stall_factor
        # A string seed is hashed with SHA-512 by `random`, the same in every process and Python version.
        self._faults = random.Random(f"{name}:{seed}")
        self.failed = 0
        self.stalled = 0
        self._lock = threading.Lock()
        self.requests = 0
        self.active = 0
        self.succeeded = 0
        self.histograms = (
            Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS),
            Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS),
            Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", E2E_BUCKETS),
        )

    @property
    def cache_queries(self) -> int:
        """Prompt tokens looked up in the prefix cache."""
        return self.prefix_cache.queries

    @property
    def cache_hits(self) -> int:
        """Prompt tokens found in the prefix cache (their prefill skipped)."""
        return self.prefix_cache.hits

    def handle_error(self, request, client_address):
        # A client (Envoy) closing a kept-alive connection is routine, not an error to print.
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)

    def count_request(self, method, path):
        with self._lock:
            self.requests += 1

    def draw_faults(self) -> tuple:
        """(fail, stall) of the next completion: two draws of the arm's seeded generator, always both."""
        with self._lock:
            fail = self._faults.random() < self.fail_fraction
            stall = self._faults.random() < self.stall_fraction and not fail
            self.failed += fail
            self.stalled += stall
        return fail, stall

    def running(self):
        """Context manager counting a request as running (the active-request-scorer's input)."""
        server = self

        class _Running:
            def __enter__(self):
                with server._lock:
                    server.active += 1

            def __exit__(self, *exc):
                with server._lock:
                    server.active -= 1
                    server.succeeded += exc[0] is None

        return _Running()

    def first_token_parts(self, prompt_tokens: int, cached_tokens: int = 0) -> tuple:
        """(seconds to wait, KV bytes to transfer) before the first token: the wait is the prefill of the
        tokens not cached, the transfer overhead, `delay` and a draw of `jitter`; the bytes are every
        prompt token's."""
        model = self.model_timing
        extra = self.delay + random.uniform(-self.jitter, self.jitter)
        wait = model.prefill(prompt_tokens, cached_tokens) + model.transfer_overhead + extra
        return max(0.0, wait), model.kv_bytes(prompt_tokens)

    def transfer(self, nbytes: float):
        """Moves `nbytes` of KV cache through the arm's link (or sleeps their unloaded time)."""
        if self.link is not None:
            self.link.transfer(nbytes)
        else:
            time.sleep(nbytes / self.model_timing.bandwidth)

    def completion_id(self, chat: bool) -> str:
        prefix = "chatcmpl" if chat else "cmpl"
        return f"{prefix}-___prefill_addr_{self.prefill}___decode_addr_{self.decode}_{uuid.uuid4().hex}"

    def completion(self, chat: bool, words: list, prompt: int) -> dict:
        text = " ".join(words)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
        else:
            choice = {"index": 0, "text": " " + text, "logprobs": None, "finish_reason": "length"}
        return {
            "id": self.completion_id(chat),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [choice],
            "usage": usage(prompt, len(words)),
        }

    def observe(self, ttft: float, gaps: list, e2e: float):
        ttft_histogram, itl_histogram, e2e_histogram = self.histograms
        with self._lock:
            ttft_histogram.observe(ttft)
            for gap in gaps:
                itl_histogram.observe(gap)
            e2e_histogram.observe(e2e)

    def metrics_text(self) -> str:
        labels = f'model_name="{self.model}"'
        with self._lock:
            running, succeeded = self.active, self.succeeded
            histograms = "".join(h.text(labels) for h in self.histograms)
        queries, hits = self.prefix_cache.counts()
        return histograms + (
            "# HELP vllm:num_requests_running Number of requests currently running.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{{{labels}}} {running}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{{{labels}}} 0\n"
            "# HELP vllm:gpu_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
            "# TYPE vllm:gpu_cache_usage_perc gauge\n"
            f"vllm:gpu_cache_usage_perc{{{labels}}} {min(1.0, running / 64):.4f}\n"
            "# HELP vllm:request_success_total Count of successfully processed requests.\n"
            "# TYPE vllm:request_success_total counter\n"
            f'vllm:request_success_total{{{labels},finished_reason="length"}} {succeeded}\n'
            # vLLM v1's prefix-cache counters, in tokens: vllm-project/vllm, vllm/v1/metrics/loggers.py
            # (PrometheusStatLogger; commit 005a810bc40faa25b8870fbc8559c3462581eee3; the names since
            # 0.9, which renamed vllm:gpu_prefix_cache_*). prometheus_client Counters named
            # vllm:prefix_cache_queries / vllm:prefix_cache_hits, exposed with _total; labels model_name
            # and engine (left out here, as on the arm's other series); increments as
            # vllm/v1/core/kv_cache_manager.py counts them: a request's prompt tokens, its cached tokens.
            "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.\n"
            "# TYPE vllm:prefix_cache_queries_total counter\n"
            f"vllm:prefix_cache_queries_total{{{labels}}} {queries}\n"
            "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.\n"
            "# TYPE vllm:prefix_cache_hits_total counter\n"
            f"vllm:prefix_cache_hits_total{{{labels}}} {hits}\n"
        )

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> "ArmServer":
        threading.Thread(target=self.serve_forever, name=f"arm-{self.arm_name}", daemon=True).start()
        return self

    def stop(self):
        self.shutdown()
        self.server_close()


def main():
    ap = argparse.ArgumentParser(description="local proxy arm (OpenAI-compatible)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--delay-ms", type=float, default=0.0, help="extra fixed time before the first token")
    ap.add_argument("--bandwidth-gbps", type=float, default=None,
                    help="KV-transfer bandwidth, GB/s (default: 200 for nvlink, 20 for fs)")
    ap.add_argument("--metrics-status", type=int, default=200)
    ap.add_argument("--fail-fraction", type=float, default=0.0, help="fraction of completions answered 503")
    ap.add_argument("--stall-fraction", type=float, default=0.0,
                    help="fraction of completions whose time to first token is multiplied by --stall-factor")
    ap.add_argument("--stall-factor", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="seed of which completions fail or stall")
    ap.add_argument("--prefix-cache-tokens", type=int, default=None,
                    help="prefix-cache capacity, tokens (default: 131072 for nvlink, 4194304 for fs; 0: none)")
    args = ap.parse_args()
    bandwidth = args.bandwidth_gbps * 1e9 if args.bandwidth_gbps else None
    server = ArmServer(args.name, args.port, delay=args.delay_ms / 1000, metrics_status=args.metrics_status,
                       bandwidth=bandwidth, fail_fraction=args.fail_fraction, stall_fraction=args.stall_fraction,
                       stall_factor=args.stall_factor, seed=args.seed, prefix_cache_tokens=args.prefix_cache_tokens)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

"""What the local arms' model predicts under load: each arm's mean time to first token in a closed-loop
experiment, `concurrency` requests always in flight, each sent to an arm drawn at random (equal
chances) when its predecessor in the slot has finished.

The arms (`kvablocal.arm`) make a request wait (prefill, the transfer overhead, the extra delay), move
its KV bytes through the arm's `Link` (processor sharing: n transfers in progress each get 1/n of the
bandwidth), then stream the answer. So the experiment is a closed queueing network of one class:
- per arm a, a processor-sharing queue (the link), visited with probability p_a = 1 / arms, of service
  demand D_a = KV bytes / bandwidth;
- the rest is a delay (infinite-server) station: Z_a = prefill + overhead + delay + decode (the answer's
  max_tokens × itl, which stands for its max_tokens − 1 gaps of mean 1.13 × itl with the tail) + think
  (the client's own time between two requests of a slot).

Processor-sharing and delay stations have product form with any service-time distribution (BCMP), and
a slot's arm drawn afresh per request is Markov routing, so exact Mean Value Analysis over the
population 1..concurrency gives the exact means of this network. This solves directly what a per-arm
decomposition approximates (each arm a PS queue plus a delay at the mean population
N_a = c · T_a / ΣT, found by a fixed point and interpolated between integers): that one leaves out how
the split of the c requests between the arms varies, which matters near the FS link's knee.

Approximations of the model against the running arms: the transfers are exactly processor sharing, but
the waits are sleeps (they overrun by a little, more on a busy machine), the jitter is taken at its
mean (0), a stall's factor is left out, and the HTTP on both sides is counted only in `think`.

The arms' prefix caches shorten the prefill of the tokens they hold, never the transfer (`hit_tokens`:
the mean cached tokens of a request; the delay station needs only the mean). How many are cached is an
LRU cache's hit ratio: `lru_hit_ratio` (Che's approximation) under requests for items of a popularity
(`zipf`), e.g. shared documents of `doc` tokens: each arm's capacity (`PREFIX_CACHE_TOKENS`) as
`capacity`, `doc` as `item_size`, the unique rest of a request's full blocks as `unique_per_request`, and
then `hit_tokens` = hit ratio × the document's full-block tokens.
"""

import math

from .arm import BANDWIDTH, MAX_ANSWER_TOKENS, PdModel


def default_models() -> dict:
    """The arms' models with the defaults `ArmServer` gives them (NVLink 200 GB/s, FS 20 GB/s)."""
    return {name: PdModel(bandwidth) for name, bandwidth in BANDWIDTH.items()}


def predict_ttft(prompt_tokens, concurrency: int, models: dict = None, max_tokens: int = 16,
                 delay: dict = None, itl: float = None, think: float = 0.0, hit_tokens: dict = None) -> dict:
    """Each arm's mean time to first token, seconds, at `concurrency` requests in flight.

    `prompt_tokens`: one size, or several (each request's size drawn among them with equal chances, as
    the experiment's balanced classes are; the arms' links carry every size, so a short prompt's transfer
    waits behind long ones). `models`: {arm: PdModel} (default: `default_models()`); `delay`: {arm: extra
    seconds before the first token} (the arm's `delay`, default 0); `itl`: seconds per answer token
    (default: each model's own `itl`); `max_tokens` is capped as the arms cap it. `hit_tokens`: {arm: mean
    prefix-cached tokens of a request}, one number for every size or {size: number} (default 0); they
    shorten the prefill only. Returns `ttft` ({arm:
    seconds} over every size), `ratio` (fs / nvlink, where both are arms), `by_size` ({size: {"ttft":
    {arm: seconds}, "ratio": fs / nvlink}}), `link_utilization` ({arm: busy fraction of its link}),
    `in_link` ({arm: mean transfers in progress}) and `throughput` (requests/s, all arms).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency is 1 or more, not {concurrency}")
    sizes = [prompt_tokens] if isinstance(prompt_tokens, int) else list(prompt_tokens)
    models = models or default_models()
    delay = delay or {}
    hit_tokens = hit_tokens or {}

    def cached(arm, size) -> float:
        hits = hit_tokens.get(arm, 0.0)
        hits = hits.get(size, 0.0) if isinstance(hits, dict) else hits
        if not 0 <= hits <= size:
            raise ValueError(f"hit_tokens of {arm} at {size} tokens is in [0, {size}], not {hits}")
        return hits

    tokens = max(1, min(max_tokens, MAX_ANSWER_TOKENS))
    # A request's type: its arm and its size, each equally likely; the types of an arm share its link.
    types = [(arm, size) for arm in models for size in sizes]
    visit = 1.0 / len(types)
    wait, demand, rest = {}, {}, {}
    for arm, size in types:
        model = models[arm]
        wait[arm, size] = model.prefill(size, cached(arm, size)) + model.transfer_overhead + delay.get(arm, 0.0)
        demand[arm, size] = model.kv_bytes(size) / model.bandwidth
        rest[arm, size] = wait[arm, size] + tokens * (model.itl if itl is None else itl) + think
    # Exact MVA (one chain, the type drawn afresh per request): a request arriving at a link while n − 1
    # others are in flight finds the mean queue of the network with n − 1 (the arrival theorem); a
    # processor-sharing link's time for a type is its demand × (1 + that queue).
    queue = {arm: 0.0 for arm in models}
    for n in range(1, concurrency + 1):
        residence = {t: demand[t] * (1.0 + queue[t[0]]) for t in types}
        cycle = sum(visit * (residence[t] + rest[t]) for t in types)
        throughput = n / cycle
        queue = {arm: throughput * visit * sum(residence[arm, size] for size in sizes) for arm in models}
    by_type = {t: wait[t] + residence[t] for t in types}

    def ratio(ttft: dict):
        return ttft["fs"] / ttft["nvlink"] if {"fs", "nvlink"} <= set(ttft) else None

    ttft = {arm: sum(by_type[arm, size] for size in sizes) / len(sizes) for arm in models}
    by_size = {}
    for size in sizes:
        of_size = {arm: by_type[arm, size] for arm in models}
        by_size[size] = {"ttft": of_size, "ratio": ratio(of_size)}
    return {
        "ttft": ttft,
        "ratio": ratio(ttft),
        "by_size": by_size,
        "link_utilization": {arm: throughput * visit * sum(demand[arm, size] for size in sizes) for arm in models},
        "in_link": queue,
        "throughput": throughput,
    }


def zipf(n: int, s: float = 1.0) -> list:
    """Popularities p_i ∝ 1 / i^s of items i = 1..n, summing to 1."""
    if n < 1:
        raise ValueError(f"n is 1 or more, not {n}")
    weights = [i ** -s for i in range(1, n + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def lru_hit_ratio(popularity, capacity: float, item_size: float = 1.0, unique_per_request: float = 0.0) -> float:
    """An LRU cache's hit ratio under independent requests, each for item i with probability
    `popularity`[i] (items of `item_size`), by Che's approximation: an item stays T requests after its
    last use, T the characteristic time that fills the cache, Σ_i (1 − e^(−p_i·T)) = capacity / item_size;
    the hit ratio is Σ_i p_i (1 − e^(−p_i·T)). `unique_per_request`: what each request adds that is never
    asked for again (a unique suffix's blocks; same unit as `capacity`); it also stays T requests, taking
    T × its size of the cache. Accurate to a few % for Zipf popularities (Che, Tung, Wang 2002; Fricker,
    Robert, Roberts 2012)."""
    total = sum(popularity)
    probabilities = [p / total for p in popularity if p > 0]
    slots, unique = capacity / item_size, unique_per_request / item_size
    if slots <= 0:
        return 0.0
    if unique <= 0 and slots >= len(probabilities):
        return 1.0

    def filled(t):  # cache occupancy (items) at characteristic time t, and its derivative
        return (sum(-math.expm1(-p * t) for p in probabilities) + unique * t,
                sum(p * math.exp(-p * t) for p in probabilities) + unique)

    # Occupancy is increasing and concave in T: Newton's steps from T = 0 rise to the root, never past it.
    t = 0.0
    for _ in range(200):
        value, slope = filled(t)
        step = (slots - value) / slope
        t += step
        if step <= 1e-12 * t:
            break
    return sum(p * -math.expm1(-p * t) for p in probabilities)

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
"""

from .arm import BANDWIDTH, MAX_ANSWER_TOKENS, PdModel


def default_models() -> dict:
    """The arms' models with the defaults `ArmServer` gives them (NVLink 200 GB/s, FS 20 GB/s)."""
    return {name: PdModel(bandwidth) for name, bandwidth in BANDWIDTH.items()}


def predict_ttft(prompt_tokens, concurrency: int, models: dict = None, max_tokens: int = 16,
                 delay: dict = None, itl: float = None, think: float = 0.0) -> dict:
    """Each arm's mean time to first token, seconds, at `concurrency` requests in flight.

    `prompt_tokens`: one size, or several (each request's size drawn among them with equal chances, as
    the experiment's balanced classes are; the arms' links carry every size, so a short prompt's transfer
    waits behind long ones). `models`: {arm: PdModel} (default: `default_models()`); `delay`: {arm: extra
    seconds before the first token} (the arm's `delay`, default 0); `itl`: seconds per answer token
    (default: each model's own `itl`); `max_tokens` is capped as the arms cap it. Returns `ttft` ({arm:
    seconds} over every size), `ratio` (fs / nvlink, where both are arms), `by_size` ({size: {"ttft":
    {arm: seconds}, "ratio": fs / nvlink}}), `link_utilization` ({arm: busy fraction of its link}),
    `in_link` ({arm: mean transfers in progress}) and `throughput` (requests/s, all arms).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency is 1 or more, not {concurrency}")
    sizes = [prompt_tokens] if isinstance(prompt_tokens, int) else list(prompt_tokens)
    models = models or default_models()
    delay = delay or {}
    tokens = max(1, min(max_tokens, MAX_ANSWER_TOKENS))
    # A request's type: its arm and its size, each equally likely; the types of an arm share its link.
    types = [(arm, size) for arm in models for size in sizes]
    visit = 1.0 / len(types)
    wait, demand, rest = {}, {}, {}
    for arm, size in types:
        model = models[arm]
        wait[arm, size] = model.prefill(size) + model.transfer_overhead + delay.get(arm, 0.0)
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

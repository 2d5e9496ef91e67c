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

Several kinds of request at one level (an experiment's cells: sizes × workloads, each equally likely):
`predict_cells`, each cell with its own `hit_tokens` per arm (`predict_ttft` is it with one cell per
size). `cache_hit_tokens` gives them for `unique` and `shared-prefix` cells: every shared-prefix cell's
groups are items of one LRU cache per arm with every cell's unique blocks (`che_hit_ratios`, Che with
items of several sizes), in the steady state or over a range of the arm's requests counted from its
empty cache (a sweep's level, warm-up included: with no eviction yet, request k finds an item with
probability 1 − e^(−p·k)); or from measured hit ratios (`prefix_hit_ratio` of the arm's counters).
`kvablocal.predict` puts the prediction beside an experiment's report.
"""

import math

from .arm import BANDWIDTH, BLOCK_TOKENS, MAX_ANSWER_TOKENS, PREFIX_CACHE_TOKENS, PdModel


def default_models() -> dict:
    """The arms' models with the defaults `ArmServer` gives them (NVLink 200 GB/s, FS 20 GB/s)."""
    return {name: PdModel(bandwidth) for name, bandwidth in BANDWIDTH.items()}


def _ratio(ttft: dict):
    return ttft["fs"] / ttft["nvlink"] if {"fs", "nvlink"} <= set(ttft) else None


def predict_cells(cells, concurrency: int, models: dict = None, max_tokens: int = 16, delay: dict = None,
                  itl: float = None, think: float = 0.0) -> dict:
    """Each arm's mean time to first token per cell, seconds, at `concurrency` requests in flight, the
    cells' requests mixed (each request's cell drawn among them with equal chances, as the balanced classes
    of one level of the experiment are; the arms' links carry every cell's transfers).

    `cells`: [{"label", "prompt_tokens", "hit_tokens": {arm: mean prefix-cached tokens of the cell's
    requests on that arm}}] ("hit_tokens" may be left out, or an arm in it: 0; see `cache_hit_tokens`);
    labels distinct. `models`: {arm: PdModel} (default: `default_models()`); `delay`: {arm: extra seconds
    before the first token} (the arm's `delay`, default 0); `itl`: seconds per answer token (default: each
    model's own `itl`); `max_tokens` is capped as the arms cap it; `think`: seconds a slot spends outside
    the arms between two requests (the client, the gateway). Returns `cells` ({label: {"ttft": {arm:
    seconds}, "ratio": fs / nvlink}}, `ratio` None unless both are arms), `ttft` ({arm: seconds} over every
    cell), `ratio`, `link_utilization` ({arm: busy fraction of its link}), `in_link` ({arm: mean transfers
    in progress}) and `throughput` (requests/s, all arms).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency is 1 or more, not {concurrency}")
    cells = list(cells)
    labels = [cell["label"] for cell in cells]
    if not cells or len(set(labels)) != len(labels):
        raise ValueError(f"cells are one or more, of distinct labels, not {labels}")
    models = models or default_models()
    delay = delay or {}

    def cached(arm, cell) -> float:
        hits = (cell.get("hit_tokens") or {}).get(arm, 0.0)
        size = cell["prompt_tokens"]
        if not 0 <= hits <= size:
            raise ValueError(f"hit_tokens of {arm} in {cell['label']} ({size} tokens) is in [0, {size}], not {hits}")
        return hits

    tokens = max(1, min(max_tokens, MAX_ANSWER_TOKENS))
    # A request's type: its arm and its cell, each equally likely; the types of an arm share its link.
    types = [(arm, i) for arm in models for i in range(len(cells))]
    visit = 1.0 / len(types)
    wait, demand, rest = {}, {}, {}
    for arm, i in types:
        model, size = models[arm], cells[i]["prompt_tokens"]
        wait[arm, i] = model.prefill(size, cached(arm, cells[i])) + model.transfer_overhead + delay.get(arm, 0.0)
        demand[arm, i] = model.kv_bytes(size) / model.bandwidth
        rest[arm, i] = wait[arm, i] + tokens * (model.itl if itl is None else itl) + think
    # Exact MVA (one chain, the type drawn afresh per request): a request arriving at a link while n − 1
    # others are in flight finds the mean queue of the network with n − 1 (the arrival theorem); a
    # processor-sharing link's time for a type is its demand × (1 + that queue).
    queue = {arm: 0.0 for arm in models}
    for n in range(1, concurrency + 1):
        residence = {t: demand[t] * (1.0 + queue[t[0]]) for t in types}
        cycle = sum(visit * (residence[t] + rest[t]) for t in types)
        throughput = n / cycle
        queue = {arm: throughput * visit * sum(residence[arm, i] for i in range(len(cells))) for arm in models}
    by_cell = {}
    for i, label in enumerate(labels):
        ttft = {arm: wait[arm, i] + residence[arm, i] for arm in models}
        by_cell[label] = {"ttft": ttft, "ratio": _ratio(ttft)}
    ttft = {arm: sum(by_cell[label]["ttft"][arm] for label in labels) / len(labels) for arm in models}
    return {
        "cells": by_cell,
        "ttft": ttft,
        "ratio": _ratio(ttft),
        "link_utilization": {arm: throughput * visit * sum(demand[arm, i] for i in range(len(cells))) for arm in models},
        "in_link": queue,
        "throughput": throughput,
    }


def predict_ttft(prompt_tokens, concurrency: int, models: dict = None, max_tokens: int = 16,
                 delay: dict = None, itl: float = None, think: float = 0.0, hit_tokens: dict = None) -> dict:
    """Each arm's mean time to first token, seconds, at `concurrency` requests in flight: `predict_cells`
    with one cell per size.

    `prompt_tokens`: one size, or several (each request's size drawn among them with equal chances, as
    the experiment's balanced classes are; the arms' links carry every size, so a short prompt's transfer
    waits behind long ones). `models`, `delay`, `itl`, `max_tokens`, `think`: as `predict_cells`.
    `hit_tokens`: {arm: mean prefix-cached tokens of a request}, one number for every size or {size:
    number} (default 0); they shorten the prefill only. Returns `ttft` ({arm: seconds} over every size),
    `ratio` (fs / nvlink, where both are arms), `by_size` ({size: {"ttft": {arm: seconds}, "ratio": fs /
    nvlink}}), `link_utilization` ({arm: busy fraction of its link}), `in_link` ({arm: mean transfers in
    progress}) and `throughput` (requests/s, all arms).
    """
    sizes = [prompt_tokens] if isinstance(prompt_tokens, int) else list(prompt_tokens)
    models = models or default_models()
    hit_tokens = hit_tokens or {}

    def cached(arm, size) -> float:
        hits = hit_tokens.get(arm, 0.0)
        return hits.get(size, 0.0) if isinstance(hits, dict) else hits

    cells = [{"label": size, "prompt_tokens": size, "hit_tokens": {arm: cached(arm, size) for arm in models}}
             for size in sizes]
    predicted = predict_cells(cells, concurrency, models, max_tokens, delay, itl, think)
    predicted["by_size"] = predicted.pop("cells")
    return predicted


def zipf(n: int, s: float = 1.0) -> list:
    """Popularities p_i ∝ 1 / i^s of items i = 1..n, summing to 1."""
    if n < 1:
        raise ValueError(f"n is 1 or more, not {n}")
    weights = [i ** -s for i in range(1, n + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def che_hit_ratios(catalogs, capacity: float, unique_per_request: float = 0.0, requests: tuple = None) -> list:
    """An LRU cache's hit ratio per catalog of items, by Che's approximation, under independent requests:
    `catalogs` is [(probabilities, item_size)], a request being for item i of a catalog with its
    probability (over every catalog's items at most 1 in all: the rest of the requests ask for nothing
    again); an item takes `item_size` of `capacity`, and every request adds `unique_per_request` (same
    unit) that is never asked for again. An item stays T requests after its last use, T the characteristic
    time that fills the cache: Σ_catalogs item_size · Σ_i (1 − e^(−p_i·T)) + unique_per_request · T =
    capacity; a catalog's hit ratio is Σ_i p_i (1 − e^(−p_i·T)) / Σ_i p_i (T the same for every catalog:
    items of any size stay as long).

    `requests`: (first, end) the range of requests, counted from an empty cache, the hit ratio is averaged
    over: the cache that has seen k requests has lost nothing before T, so request k finds item i with
    probability 1 − e^(−p_i·min(k, T)) (with no eviction, the chance that one of the k before asked for
    it); None: the cache in its steady state."""
    probabilities = [[p for p in ps if p > 0] for ps, _ in catalogs]
    sizes = [float(size) for _, size in catalogs]
    if capacity <= 0:
        return [0.0] * len(catalogs)
    t = math.inf
    if unique_per_request > 0 or sum(size * len(ps) for size, ps in zip(sizes, probabilities)) > capacity:
        def filled(t):  # cache occupancy at characteristic time t, and its derivative
            return (sum(size * -math.expm1(-p * t) for size, ps in zip(sizes, probabilities) for p in ps)
                    + unique_per_request * t,
                    sum(size * p * math.exp(-p * t) for size, ps in zip(sizes, probabilities) for p in ps)
                    + unique_per_request)

        # Occupancy is increasing and concave in T: Newton's steps from T = 0 rise to the root, never past it.
        t = 0.0
        for _ in range(200):
            value, slope = filled(t)
            step = (capacity - value) / slope
            t += step
            if step <= 1e-12 * t:
                break

    def found(p) -> float:  # the chance that a request for an item of probability p finds it
        if requests is None:
            return -math.expm1(-p * t)
        first, end = requests
        if not 0 <= first < end:
            raise ValueError(f"requests is (first, end), 0 <= first < end, not {requests}")
        cut = min(end, max(first, math.ceil(t))) if t < math.inf else end  # k < cut: min(k, T) = k
        # Σ_{k=first}^{cut−1} e^(−p·k), a geometric sum, then the requests past T at e^(−p·T).
        missed = math.exp(-p * first) * -math.expm1(-p * (cut - first)) / -math.expm1(-p) if cut > first else 0.0
        missed += (end - cut) * math.exp(-p * t) if end > cut else 0.0
        return 1.0 - missed / (end - first)

    return [sum(p * found(p) for p in ps) / sum(ps) if ps else 0.0 for ps in probabilities]


def lru_hit_ratio(popularity, capacity: float, item_size: float = 1.0, unique_per_request: float = 0.0) -> float:
    """An LRU cache's hit ratio under independent requests, each for item i with probability
    `popularity`[i] (items of `item_size`), by Che's approximation: an item stays T requests after its
    last use, T the characteristic time that fills the cache, Σ_i (1 − e^(−p_i·T)) = capacity / item_size;
    the hit ratio is Σ_i p_i (1 − e^(−p_i·T)). `unique_per_request`: what each request adds that is never
    asked for again (a unique suffix's blocks; same unit as `capacity`); it also stays T requests, taking
    T × its size of the cache. Accurate to a few % for Zipf popularities (Che, Tung, Wang 2002; Fricker,
    Robert, Roberts 2012). `che_hit_ratios` with one catalog."""
    total = sum(popularity)
    return che_hit_ratios([([p / total for p in popularity], item_size)], capacity, unique_per_request)[0]


def prefix_tokens(cell: dict, block_tokens: int = BLOCK_TOKENS) -> int:
    """The tokens of a cell's request that a prefix cache can serve from another request: a shared-prefix
    cell's prefix (the prompt less the suffix), its full blocks short of the prompt's last token; 0 for
    any other cell."""
    workload = cell.get("workload") or {}
    if workload.get("kind") != "shared-prefix":
        return 0
    size = cell["prompt_tokens"]
    prefix = max(1, size - workload.get("suffix_tokens", 64))
    return min(prefix // block_tokens, max(0, size - 1) // block_tokens) * block_tokens


def cache_hit_tokens(cells, capacity: dict = None, requests: tuple = None, hit_ratio: dict = None,
                     block_tokens: int = BLOCK_TOKENS) -> dict:
    """Each cell's mean prefix-cached tokens per arm ({label: {arm: tokens}}), the `hit_tokens` of
    `predict_cells`, when the cells' requests are mixed with equal chances on each arm's LRU prefix cache.

    `cells`: [{"label", "prompt_tokens", "workload": {"kind": "unique"} or {"kind": "shared-prefix",
    "groups", "zipf", "suffix_tokens"}}] (as the records header's `workloads`; no "workload": unique). A
    unique prompt hits nothing. A shared-prefix cell's groups are items of its popularity (`zipf`) and of
    its prefix's full blocks (`prefix_tokens`); every request also caches its own blocks (a unique
    prompt's full blocks, a shared-prefix prompt's past its prefix's), never asked for again. The hit
    ratio of the groups is Che's (`che_hit_ratios`) in each arm's `capacity` ({arm: tokens}, default
    `PREFIX_CACHE_TOKENS`; whole blocks), steady or over the arm's `requests` (first, end) counted from
    its empty cache (a sweep's level: its warm-up and measured requests after the levels before); a
    cell's hit tokens are that ratio × its prefix's tokens. `hit_ratio`: {arm: measured fraction of a
    shared prefix's tokens found cached} for an arm instead of Che's (`prefix_hit_ratio` from the arm's
    counters)."""
    cells = list(cells)
    capacity = PREFIX_CACHE_TOKENS if capacity is None else capacity
    hit_ratio = hit_ratio or {}
    share = 1.0 / len(cells)
    shared = [cell for cell in cells if prefix_tokens(cell, block_tokens) > 0]
    catalogs = [([share * p for p in zipf(cell["workload"]["groups"], cell["workload"].get("zipf", 1.0))],
                 prefix_tokens(cell, block_tokens)) for cell in shared]
    unique = share * sum(cell["prompt_tokens"] // block_tokens * block_tokens - prefix_tokens(cell, block_tokens)
                         for cell in cells)
    ratios = {}
    for arm, tokens in capacity.items():
        if arm in hit_ratio:
            ratios[arm] = [hit_ratio[arm]] * len(shared)
        else:
            ratios[arm] = che_hit_ratios(catalogs, tokens // block_tokens * block_tokens, unique, requests)
    hits = {cell["label"]: {arm: 0.0 for arm in capacity} for cell in cells}
    for i, cell in enumerate(shared):
        for arm in capacity:
            hits[cell["label"]][arm] = ratios[arm][i] * prefix_tokens(cell, block_tokens)
    return hits


def prefix_hit_ratio(hits: float, queries: float, cells, block_tokens: int = BLOCK_TOKENS) -> float:
    """The fraction of the shared prefixes' tokens an arm found cached, from its counters
    (`vllm:prefix_cache_hits_total`, `vllm:prefix_cache_queries_total`, or `ArmServer`'s `cache_hits`,
    `cache_queries`: tokens) over a run of `cells` in equal shares (their hits all the prefixes': a
    unique prompt hits nothing): hits / (queries × the prefixes' share of the prompt tokens). One
    fraction for every shared-prefix cell, as Che's approximation has it (an item stays as long whatever
    its size)."""
    cells = list(cells)
    prefixes = sum(prefix_tokens(cell, block_tokens) for cell in cells)
    if queries <= 0 or prefixes <= 0:
        return 0.0
    return min(1.0, hits / (queries * prefixes / sum(cell["prompt_tokens"] for cell in cells)))


def think_from_throughput(concurrency: int, throughput: float, in_flight: float) -> float:
    """The seconds a closed loop's slot spends outside the arms per request, by Little's law: of the
    `concurrency` slots, `in_flight` are on average in the arms' requests (their end-to-end time over the
    measured time, as the client times them), the rest in the client between requests; at `throughput`
    requests/s that is (concurrency − in_flight) / throughput per request (= concurrency / throughput −
    the mean end-to-end time). The gateway's time is inside the end-to-end time, so not in it."""
    if throughput <= 0:
        return 0.0
    return max(0.0, (concurrency - in_flight) / throughput)

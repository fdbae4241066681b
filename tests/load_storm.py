"""The load storm of ``tests/test_load_soak.py`` (and ``benchmarks/storm.py``): its workload, clients and checks.

See the soak's docstring for what the workload holds and why every answer has a well-defined
reference. ``storm(server, clients)`` computes the references (each request alone after a
flush), then runs every job from ``clients`` threads against the live server and returns a
``StormResult``; it asserts nothing about the outcome (the callers do).
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests

CLIENTS = 16
TOL = 1e-4  # fp32 end to end (tests/test_holes_backend.py)
MAX_NEW = 6
LONG_NEW = 160
TIME_LIMIT_S = 420
WORDS = [a + b for a in ("ka", "lo", "mi", "ne", "su", "ta", "ve", "ro", "di", "pa") for b in
         ("ren", "mol", "tis", "gan", "bor", "lek", "sun", "dav", "pim", "ho")]
POLICIES = [("none", {}), ("first_k", {"k": 6}), ("first_k", {"k": 0}), ("deviation", {"ratio": 0.15}),
            ("query", {"ratio": 0.15, "layers": 2}), ("query", {"ratio": 0.3})]


@dataclass
class Job:
    kind: str  # plain | long | evict | chunk | chat | abort | hangup
    route: str
    body: dict
    ref: tuple | None = None  # key of the reference answer


@dataclass
class Tally:
    checked: dict[str, int] = field(default_factory=dict)
    reused_chunks: int = 0
    evicted: int = 0
    refused: int = 0
    aborted: int = 0
    mismatches: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, kind: str) -> None:
        with self.lock:
            self.checked[kind] = self.checked.get(kind, 0) + 1


def _gen_body(ids: list[int], hints: dict | None = None, **extra: object) -> dict:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0.0},
            "return_logprob": True, "top_logprobs_num": 5}
    body.update(extra)
    if hints is not None:
        body["kv_hints"] = hints
    return body


def _chat_body(system: str, docs: list[str], question: str, policy: tuple[str, dict] | None) -> dict:
    body = {"model": "default", "temperature": 0, "max_tokens": MAX_NEW, "logprobs": True, "top_logprobs": 5,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": [{"type": "text", "text": t} for t in [*docs, question]]}]}
    if policy is not None:
        body["chunk_reuse"] = {"policy": policy[0], **policy[1]}
    return body


def _chain_prompt(system: list[int], chain: list[list[int]], j: int) -> tuple[list[int], list[tuple[int, int]]]:
    """``system`` then the chain's first ``j`` documents, and the documents' spans."""
    ids, spans = list(system), []
    for d in chain[:j]:
        spans.append((len(ids), len(ids) + len(d)))
        ids += d
    return ids, spans


def _workload(rng: random.Random) -> tuple[list[Job], dict[tuple, Job]]:
    """The jobs, and for each reference key the request whose answer served alone is the reference."""
    from sglang_holes.chunks.hints import chunk_envelope

    def toks(n: int) -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(n)]

    prefixes = [toks(300) for _ in range(4)]
    plain = [prefixes[i % 4] + toks(rng.randint(100, 900)) for i in range(14)]
    system = toks(24)
    chains = [[toks(rng.randint(60, 140)) for _ in range(5)] for _ in range(3)]
    text_chains = [[" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 90))) for _ in range(4)]
                   for _ in range(3)]
    jobs, refs = [], {}
    for _ in range(44):
        i = rng.randrange(len(plain))
        jobs.append(Job("plain", "/generate", _gen_body(plain[i]), ("plain", i)))
        refs[("plain", i)] = jobs[-1]
    for n in range(8):  # long decodes: SGLang under-reserves them, so a full pool retracts requests
        i = rng.randrange(len(plain))
        body = _gen_body(plain[i], sampling_params={"max_new_tokens": LONG_NEW, "temperature": 0.0,
                                                    "ignore_eos": True})
        if n % 2:  # a chunk request that will be retracted and prefilled again
            ids, spans = _chain_prompt(system, chains[n % 3], 5)
            body = _gen_body(ids, chunk_envelope(spans, "none"), sampling_params=body["sampling_params"])
        key = ("long", tuple(body["input_ids"]))
        jobs.append(Job("long", "/generate", body, key))
        refs[key] = Job("long", "/generate", {k: v for k, v in body.items() if k != "kv_hints"})
    for _ in range(26):
        ids = plain[rng.randrange(len(plain))]
        s = rng.randrange(len(ids) - 2)
        jobs.append(Job("evict", "/holes/evict", {"input_ids": ids, "start": s,
                                                  "end": min(len(ids) - 1, s + rng.randint(1, 120))}))
    for n in range(30):
        c, j, q = rng.randrange(3), rng.randint(2, 5), rng.randrange(2)
        ids, spans = _chain_prompt(system, chains[c], j)
        ids += [7, 8, 9, 10 + c, 20 + j, 30 + q]  # the question: computed, never a chunk
        policy, params = POLICIES[n % len(POLICIES)] if n % 7 else ("explicit", {"recompute": [spans[-1]]})
        body = _gen_body(ids, chunk_envelope(spans, policy, **params))
        jobs.append(Job("chunk", "/generate", body, ("ids", tuple(ids))))
        refs[("ids", tuple(ids))] = Job("chunk", "/generate", _gen_body(ids))
    for n in range(18):
        c, j = rng.randrange(3), rng.randint(1, 4)
        question = f"Question {c}.{j}: which {WORDS[c]} holds the {WORDS[j]}?"  # one chunk per (chain, length)
        body = _chat_body("Answer from the documents.", text_chains[c][:j], question, POLICIES[n % len(POLICIES)])
        jobs.append(Job("chat", "/v1/chat/completions", body, ("chat", c, j)))
        refs[("chat", c, j)] = Job("chat", "/v1/chat/completions", body)
    for n in range(12):  # aborted mid-prefill: long new prompts, plain or storing chain documents
        if n % 2:
            ids, spans = _chain_prompt(system, chains[rng.randrange(3)], 5)
            body = _gen_body(ids + toks(900), chunk_envelope(spans, "none"), rid=f"abort-{n}")
        else:
            body = _gen_body(toks(rng.randint(1200, 1800)), rid=f"abort-{n}")
        jobs.append(Job("abort" if n % 3 else "hangup", "/generate", body))
    rng.shuffle(jobs)
    return jobs, refs


def _answer(kind: str, r: requests.Response) -> list[tuple[int, list[tuple[int, float]]]]:
    """Per output token: (id or token text, top-5 as (id or text, logprob))."""
    out = r.json()
    if kind == "chat":
        content = out["choices"][0]["logprobs"]["content"]
        return [(t["token"], [(x["token"], x["logprob"]) for x in t["top_logprobs"]]) for t in content]
    meta = out["meta_info"]
    return [(tok, [(x[1], x[0]) for x in top]) for tok, top in zip(out["output_ids"], meta["output_top_logprobs"],
                                                                    strict=True)]


def _differs(got: list, ref: list) -> str | None:
    """Why two answers differ beyond fp32 noise, or None. Tokens must be equal; the top-5 logprobs equal
    within ``TOL`` by value, by id where both have the id (ids whose logprobs tie within ``TOL`` may
    swap order, or swap in and out at the fifth place)."""
    if [t for t, _ in got] != [t for t, _ in ref]:
        i = next(i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a[0] != b[0]) \
            if len(got) == len(ref) else 0
        return f"token {i}: {got[i][0] if i < len(got) else None} != {ref[i][0]} (top-5 {ref[i][1][:3]}...)"
    for i, ((_, a), (_, b)) in enumerate(zip(got, ref, strict=True)):
        values = max((abs(x - y) for (_, x), (_, y) in zip(sorted(a, key=lambda t: -t[1]),
                                                          sorted(b, key=lambda t: -t[1]), strict=True)), default=0.0)
        da, db = dict(a), dict(b)
        same = max((abs(da[k] - db[k]) for k in da.keys() & db.keys()), default=0.0)
        swapped = [k for k in da.keys() ^ db.keys() if abs({**db, **da}[k] - min(da.values())) > TOL]
        if values > TOL or same > TOL or swapped:
            return f"token {i}: top-5 {a} != {b}"
    return None


def _references(server, refs: dict[tuple, Job]) -> dict[tuple, list]:
    out = {}
    for key, job in refs.items():
        server.flush()
        r = server.post(job.route, job.body)
        assert r.status_code == 200, (key, r.text)
        out[key] = _answer(job.kind, r)
    server.flush()
    return out


def _run(server, job: Job, reference: dict, tally: Tally) -> None:
    if job.kind == "evict":
        # Cache the prompt first: under 16 clients and a small pool it is otherwise often gone (or not
        # yet there) when the eviction lands, and a run could end with no hole punched by hand at all.
        warm = server.post("/generate", {"input_ids": job.body["input_ids"], "sampling_params": {"max_new_tokens": 1}})
        assert warm.status_code == 200, warm.text
        r = server.post(job.route, job.body)
        assert r.status_code in (200, 400), r.text
        with tally.lock:
            if r.status_code == 200:
                tally.evicted += r.json()["freed_tokens"]
            else:
                tally.refused += 1
        return
    if job.kind == "hangup":  # the client goes away mid-prefill; the server aborts the request
        try:
            server.post(job.route, job.body, timeout=0.3)
        except requests.exceptions.Timeout:
            pass
        return
    if job.kind == "abort":
        done: list[requests.Response] = []
        t = threading.Thread(target=lambda: done.append(server.post(job.route, job.body)))
        t.start()
        time.sleep(random.Random(job.body["rid"]).uniform(0.05, 0.6))
        server.post("/abort_request", {"rid": job.body["rid"]})
        t.join(timeout=120)
        assert done and done[0].status_code in (200, 400), done and done[0].text
        with tally.lock:
            tally.aborted += 1
        return
    r = server.post(job.route, job.body)
    assert r.status_code == 200, (job.kind, r.text)
    why = _differs(_answer(job.kind, r), reference[job.ref])
    name = f"{job.kind} {job.ref[0]} prompt of {len(job.body.get('input_ids', ()))} tokens" if job.ref else job.kind
    if job.kind == "chunk":
        with tally.lock:
            tally.reused_chunks += r.json()["meta_info"]["chunk_reuse"]["reused_chunks"]
    if why is not None:
        with tally.lock:
            tally.mismatches.append(f"{name}: {why}")
    tally.count(job.kind)


@dataclass
class StormResult:
    tally: Tally
    before: dict  # the server's cache state before the storm (after the references)
    after: dict  # ... and after it
    retracted: int  # requests SGLang retracted during the storm (from its log)
    seconds: float
    jobs: dict[str, int]


def storm(server, clients: int = CLIENTS, seed: int = 19, time_limit_s: float = TIME_LIMIT_S, progress=None
          ) -> StormResult:
    """Run the workload against ``server`` (``tests.live_server.LiveServer``) from ``clients`` threads."""
    jobs, refs = _workload(random.Random(seed))
    reference = _references(server, refs)
    before = server.cache()
    retracted0 = server.log.read_text(errors="replace").count("#retracted_reqs: ")
    tally = Tally()
    start = time.time()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(_run, server, job, reference, tally) for job in jobs]
        for f in futures:
            f.result(timeout=max(1.0, time_limit_s - (time.time() - start)))
            if progress is not None:
                progress.update(1)
    seconds = time.time() - start
    after = server.cache() if server.alive() else {}
    retracted = server.log.read_text(errors="replace").count("#retracted_reqs: ") - retracted0
    kinds: dict[str, int] = {}
    for job in jobs:
        kinds[job.kind] = kinds.get(job.kind, 0) + 1
    return StormResult(tally, before, after, retracted, seconds, kinds)

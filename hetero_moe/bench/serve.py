"""`hetero-moe bench serve`: concurrent streaming clients against a running server on this box.

For each concurrency level, that many clients send a prompt of random token ids at once and stream
`max_tokens` tokens (past EOS). Reported per level: aggregate tok/s, per-request decode tok/s, time
to first token, and the batched roofline: the DRAM read bandwidth (measured here, in the same run)
divided by the weight bytes of the distinct experts a step streams (the server's counters,
`hetero_moe_decode_routed_expert_bytes_total / hetero_moe_decode_steps_total` over the level: steps of
decode tokens only, no prompt chunk), times the tokens such a step carries on average.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import threading
import time
import urllib.error
import urllib.request

from hetero_moe.bench.experts import dram_read_gbps

VOCAB_FLOOR = 300  # prompt token ids stay below this: every model's vocabulary holds them
COUNTERS = ("steps_total", "decode_steps_total", "decode_step_tokens_total", "decode_routed_expert_bytes_total")


def _get(url: str, headers: dict) -> str:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
        return response.read().decode()


def scrape(url: str, headers: dict) -> dict[str, float]:
    text = _get(f"{url}/metrics", headers)
    out = {}
    for name in COUNTERS:
        match = re.search(rf"^hetero_moe_{name} ([0-9.e+]+)$", text, re.MULTILINE)
        if match is None:
            raise ValueError(f"{url}/metrics has no hetero_moe_{name}: is this a hetero-moe server?")
        out[name] = float(match.group(1))
    return out


def _stream(url: str, headers: dict, body: dict, record: dict) -> None:
    """One streaming client: the time it sent, and the arrival time of each token's chunk."""
    request = urllib.request.Request(
        f"{url}/v1/completions", data=json.dumps(body).encode(), headers={**headers, "Content-Type": "application/json"}
    )
    record["sent"] = time.perf_counter()
    times = []
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            for raw in response:
                line = raw.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]" and '"text"' in line:
                    times.append(time.perf_counter())
    except urllib.error.HTTPError as e:
        record["error"] = f"HTTP {e.code}: {e.read().decode()[:200]}"
        return
    record["times"] = times


def run(
    url: str,
    concurrency: list[int],
    prompt_tokens: int = 128,
    max_tokens: int = 64,
    api_key: str | None = None,
    model: str | None = None,
) -> dict:
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    dram = dram_read_gbps()
    model = model or json.loads(_get(f"{url}/v1/models", headers))["data"][0]["id"]
    rng = random.Random(0)
    levels = []
    for c in concurrency:
        before = scrape(url, headers)
        records: list[dict] = [{} for _ in range(c)]
        bodies = [
            {
                "model": model,
                "prompt": [rng.randrange(3, VOCAB_FLOOR) for _ in range(prompt_tokens)],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            }
            for _ in range(c)
        ]
        threads = [
            threading.Thread(target=_stream, args=(url, headers, b, r)) for b, r in zip(bodies, records, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = scrape(url, headers)
        levels.append(_level(c, records, before, after, dram["best"]))
    return {
        "url": url,
        "model": model,
        "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens,
        "dram_read_gbps": dram,
        "levels": levels,
    }


def _level(c: int, records: list[dict], before: dict, after: dict, dram_gbps: float) -> dict:
    errors = [r["error"] for r in records if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} of {c} requests failed, e.g. {errors[0]}")
    ttft = [r["times"][0] - r["sent"] for r in records]
    per_request = [(len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]) for r in records if len(r["times"]) > 1]
    tokens = sum(len(r["times"]) for r in records)
    wall = max(r["times"][-1] for r in records) - min(r["sent"] for r in records)
    delta = {name: after[name] - before[name] for name in COUNTERS}
    decode_steps = delta["decode_steps_total"]
    bytes_per_step = delta["decode_routed_expert_bytes_total"] / decode_steps if decode_steps else None
    tokens_per_step = delta["decode_step_tokens_total"] / decode_steps if decode_steps else None
    roofline = tokens_per_step * dram_gbps * 1e9 / bytes_per_step if bytes_per_step else None
    decode = sum(per_request)
    return {
        "concurrency": c,
        "aggregate_tok_s": tokens / wall,
        "aggregate_decode_tok_s": decode,
        "per_request_decode_tok_s": statistics.mean(per_request) if per_request else None,
        "ttft_s": {"mean": statistics.mean(ttft), "max": max(ttft)},
        "steps": delta["steps_total"],
        "decode_steps": decode_steps,
        "tokens_per_decode_step": tokens_per_step,
        "routed_bytes_per_decode_step": bytes_per_step,
        "batched_roofline_tok_s": roofline,
        "share_of_roofline": decode / roofline if roofline else None,
    }


WORDS = ("model", "expert", "token", "memory", "router", "layer", "cache", "prompt", "answer", "weight")


def multi_turn(url: str, turns: int, history_tokens: int, max_tokens: int = 64, api_key: str | None = None) -> dict:
    """Simulated chats: a history of about `history_tokens` tokens, then `turns` turns, each appending a user
    message to the previous answer. Run twice: as chat apps send it (the prefix cache can reuse each
    earlier turn), and with a fresh word at the very start of every turn (nothing can be reused: the
    time without the cache, on the same server, prompt lengths equal). Time to first token per turn."""
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model = json.loads(_get(f"{url}/v1/models", headers))["data"][0]["id"]
    rng = random.Random(0)
    history = " ".join(rng.choice(WORDS) for _ in range(history_tokens))
    questions = [" ".join(rng.choice(WORDS) for _ in range(12)) + "?" for _ in range(turns)]
    runs = {}
    for name, fresh in (("cached", False), ("uncached", True)):
        messages = [{"role": "system", "content": history}]
        runs[name] = []
        for turn, question in enumerate(questions):
            messages.append({"role": "user", "content": question})
            sent = messages
            if fresh:  # a different first word: no page of this prompt was seen before
                sent = [{"role": "system", "content": f"{name}{turn}{rng.random()} {history}"}, *messages[1:]]
            body = {"model": model, "messages": sent, "max_tokens": max_tokens, "temperature": 0, "stream": True}
            body["stream_options"] = {"include_usage": True}
            record = _chat_turn(url, headers, body)
            runs[name].append(record)
            messages.append({"role": "assistant", "content": record.pop("answer")})
    rows = [
        {
            "turn": t + 1,
            **{f"{k}_{name}": runs[name][t][k] for name in runs for k in ("ttft_s", "cached_tokens")},
            "prompt_tokens": runs["cached"][t]["prompt_tokens"],
        }
        for t in range(turns)
    ]
    last = rows[-1]
    return {
        "url": url,
        "model": model,
        "turns": rows,
        "last_turn_ttft_ratio": last["ttft_s_cached"] / last["ttft_s_uncached"],
    }


def _chat_turn(url: str, headers: dict, body: dict) -> dict:
    """One streamed chat turn: time to its first token, its answer, its prompt and cached token counts."""
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={**headers, "Content-Type": "application/json"},
    )
    sent, first, answer, usage = time.perf_counter(), None, [], {}
    with urllib.request.urlopen(request, timeout=3600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                if "role" in choice["delta"]:
                    continue  # the opening chunk, sent before any token
                first = first or time.perf_counter()
                answer.append(choice["delta"].get("content") or "")
    return {
        "ttft_s": first - sent,
        "answer": "".join(answer),
        "prompt_tokens": usage["prompt_tokens"],
        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
    }


def format_multi_turn(r: dict) -> str:
    lines = [
        f"{r['model']} at {r['url']}: time to first token per turn, with the prefix cache and without",
        f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT':>8} {'uncached':>9} {'ratio':>6}",
    ]
    for x in r["turns"]:
        lines.append(
            f"{x['turn']:>4} {x['prompt_tokens']:>7} {x['cached_tokens_cached']:>7} {x['ttft_s_cached']:>7.2f}s "
            f"{x['ttft_s_uncached']:>8.2f}s {x['ttft_s_cached'] / x['ttft_s_uncached']:>6.0%}"
        )
    return "\n".join(lines)


def format_report(r: dict) -> str:
    lines = [
        f"{r['model']} at {r['url']}: prompts of {r['prompt_tokens']} tokens, {r['max_tokens']} new tokens; "
        f"DRAM read {r['dram_read_gbps']['best']:.1f} GB/s",
        f"{'clients':>7} {'tok/s':>8} {'decode tok/s':>12} {'per request':>11} {'TTFT mean':>9} "
        f"{'GB/step':>8} {'roofline':>9} {'share':>6}",
    ]
    for x in r["levels"]:
        roof = f"{x['batched_roofline_tok_s']:.1f}" if x["batched_roofline_tok_s"] else "-"
        share = f"{x['share_of_roofline']:.0%}" if x["share_of_roofline"] else "-"
        lines.append(
            f"{x['concurrency']:>7} {x['aggregate_tok_s']:>8.1f} {x['aggregate_decode_tok_s']:>12.1f} "
            f"{x['per_request_decode_tok_s'] or 0:>11.1f} {x['ttft_s']['mean']:>8.2f}s "
            f"{(x['routed_bytes_per_decode_step'] or 0) / 1e9:>8.3f} {roof:>9} {share:>6}"
        )
    return "\n".join(lines)

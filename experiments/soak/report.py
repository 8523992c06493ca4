"""The soak's accounting: what was sent against what came out, the checks
that decide its exit code, and the table it prints."""

from __future__ import annotations

import collections

from experiments.soak.config import KILLABLE
from experiments.soak.traffic import Traffic, Watcher


def short_reason(reason: str) -> str:
    return reason.split(":")[0]


JOINER_GAUGES = ("waiting", "in_memory")   # states, not counts: the last life's
K_TOPIC = {"features": "features", "actions": "actions", "examples": "examples", "dead_letters": "dead-letters"}


def account(traffic: Traffic, watcher: Watcher, trainer: dict | None, joiner_stats: dict, children: dict,
            kills_log: list) -> dict:
    """The counts the soak reports."""
    with watcher.lock:
        dead = list(watcher.dead)
        emitted = collections.Counter(watcher.examples)
        example_messages, unreadable = watcher.example_messages, watcher.unreadable_examples
    with traffic.lock:
        valid, valid_rids = traffic.valid, set(traffic.valid_rids)
        bad, expect_trainer = dict(traffic.bad), dict(traffic.expect_trainer_dead)
        injected, undelivered, dups = dict(traffic.injected), dict(traffic.undelivered), dict(traffic.dups)
    trained = trainer.get("examples") if trainer else None
    duplicates = trainer.get("duplicates") if trainer else None
    by_reason = collections.Counter(short_reason(r) for _, _, r, _, _ in dead)
    joiner_dead = {(src, key) for src, key, _, _, _ in dead if src in ("features", "actions")}
    trainer_dead_rids = collections.Counter(rid for src, _, _, _, rids in dead if src == "examples" and rids
                                            for rid in rids)
    # Every injected bad message: among the dead letters?
    missing = sorted(f"{kind} {topic} {key}" for (topic, key), (kind, _) in bad.items()
                     if (topic, key) not in joiner_dead)
    missing += sorted(f"{kind} {rid} (expected from the trainer)" for rid, kind in expect_trainer.items()
                      if rid not in trainer_dead_rids)
    counters: collections.Counter = collections.Counter()
    for stats in joiner_stats.values():   # summed over the joiner's lives (a restarted one re-reads some)
        counters.update({k: v for k, v in stats.items() if isinstance(v, int) and not isinstance(v, bool)
                         and k not in JOINER_GAUGES})
    last = joiner_stats[max(joiner_stats)] if joiner_stats else {}
    dup_counted = counters.get("duplicate_features", 0) + counters.get("repeat_actions", 0)
    emitted_valid = {r: n for r, n in emitted.items() if r in valid_rids}
    twice = {r: n for r, n in emitted_valid.items() if n > 1}
    return {
        "valid_requests": valid, "valid_undelivered": traffic.valid_failed, "positive_actions": traffic.actions,
        "examples_trained": trained, "duplicates_dropped": duplicates,
        "trained_minus_valid": None if trained is None else trained - valid,
        "faults_injected": injected, "faults_undelivered": undelivered,
        "bad_messages_expected_dead": len(bad) + len(expect_trainer),
        "bad_messages_unaccounted": missing[:50], "bad_messages_unaccounted_n": len(missing),
        "duplicates_injected": dups, "duplicates_counted_by_joiner": dup_counted,
        "dead_letters": len(dead), "dead_letters_by_reason": dict(by_reason.most_common()),
        "dead_letters_by_source": dict(collections.Counter(src for src, _, _, _, _ in dead)),
        "trainer_dead_letter_examples": sum(trainer_dead_rids.values()),
        "trainer_dead_letter_valid_examples": sum(n for r, n in trainer_dead_rids.items() if r in valid_rids),
        "trainer_dead_letters_unreadable": sum(1 for src, _, _, _, rids in dead if src == "examples" and rids is None),
        "joiner_counters": dict(counters), "joiner_lives": len(joiner_stats),
        "joiner_at_end": {k: last.get(k) for k in JOINER_GAUGES},
        "examples_topic": {"messages": example_messages, "unreadable": unreadable, "examples": sum(emitted.values()),
                           "valid_requests_emitted": len(emitted_valid),
                           "valid_requests_emitted_twice_or_more": len(twice),
                           "extra_emissions": sum(n - 1 for n in twice.values()),
                           "valid_requests_never_emitted": len(valid_rids) - len(emitted_valid)},
        "kills": {name: children[name].kills for name in KILLABLE if name in children},
        "restarts": {name: c.restarts for name, c in children.items()},
        "kill_log": kills_log,
        "unexpected_exits": {name: [(life, rc) for life, rc, _ in c.exits] for name, c in children.items() if c.exits},
        "trainer_summary": {k: trainer.get(k) for k in ("examples", "batches", "resumed_from", "dead_letters",
                                                         "dead_letter_reasons", "table_rows", "sync")}
        if trainer else None,
    }


def verdict(res: dict) -> dict:
    """`checks` (each True or False) and `ok`: all of them."""
    trained, valid = res.get("examples_trained"), res.get("valid_requests")
    duplicates = res.get("duplicates_dropped")
    dup_injected = sum((res.get("duplicates_injected") or {}).values())
    dup_counted = res.get("duplicates_counted_by_joiner", 0) + (duplicates if isinstance(duplicates, int) else 0)
    up = res.get("up_at_end") or {}
    res["checks"] = {
        "trained_equals_valid": trained is not None and trained == valid,
        "bad_messages_accounted": "bad_messages_unaccounted_n" in res and res["bad_messages_unaccounted_n"] == 0
        and dup_counted >= dup_injected,
        "serving_holds_trainer_rows": bool((res.get("serving_rows") or {}).get("ok")),
        "all_up_at_end": bool(up) and all(up.values()) and not res.get("unexpected_exits")
        and bool(res.get("drained")) and res.get("trainer_exit") == 0 and "error" not in res,
    }
    res["ok"] = all(res["checks"].values())
    return res


def table(res: dict) -> str:
    """The short table printed after the JSON line."""
    n = lambda v: "None" if v is None else f"{v:,}" if isinstance(v, int) else str(v)  # noqa: E731
    lines = [f"soak of {res['job']}: {res['minutes']:g} min of traffic, seed {res['seed']}, "
             f"{res.get('seconds', 0):.0f} s in all (run folder {res['run_dir']})"]
    valid, trained = res.get("valid_requests"), res.get("examples_trained")
    diff, dups = res.get("trained_minus_valid"), res.get("duplicates_dropped")
    et = res.get("examples_topic", {})
    why = [f"{et.get('extra_emissions', 0):,} examples emitted again by the joiner (at-least-once after its SIGKILL)"
           + (": the trainer has no 'duplicates' field" if dups is None else f", {dups:,} dropped by the trainer"),
           f"{res.get('trainer_dead_letter_valid_examples', 0):,} valid examples dead-lettered by the trainer",
           f"{et.get('valid_requests_never_emitted', 0):,} valid requests never emitted"]
    note = "MISMATCH (no trainer summary)" if diff is None else "equal" if diff == 0 else \
        f"MISMATCH {diff:+,}: " + "; ".join(why)
    lines.append(f"  {'valid requests sent':28} {n(valid)}")
    lines.append(f"  {'examples trained':28} {n(trained)}   {note}")
    lines.append(f"  {'duplicates dropped (trainer)':28} {n(dups)}   (the joiner emitted "
                 f"{et.get('extra_emissions', 0):,} examples again, of {et.get('valid_requests_emitted', 0):,} "
                 f"valid requests it emitted)")
    fi = res.get("faults_injected", {})
    lines.append(f"  {'faults injected':28} {sum(fi.values()):,}: "
                 + ", ".join(f"{k} {v}" for k, v in sorted(fi.items())))
    expected = res.get("bad_messages_expected_dead", 0)
    lines.append(f"  {'bad messages accounted':28} {expected - res.get('bad_messages_unaccounted_n', 0):,}"
                 f" of {expected:,} expected dead letters found; duplicates "
                 f"{sum(res.get('duplicates_injected', {}).values()):,} injected, "
                 f"{res.get('duplicates_counted_by_joiner', 0):,} counted by the joiner (over its lives)"
                 + (f" and {dups:,} by the trainer" if isinstance(dups, int) else ""))
    lines.append(f"  {'dead letters by reason':28} " + "; ".join(f"{k} {v}" for k, v in
                                                              res.get("dead_letters_by_reason", {}).items()))
    jc = res.get("joiner_counters", {})
    keys = ("features", "actions", "positives", "negatives", "duplicate_features", "repeat_actions", "late_actions",
            "orphan_actions", "bad_times", "dead_letters")
    lines.append(f"  {'joiner counters (all lives)':28} " + ", ".join(f"{k} {jc.get(k, 0):,}" for k in keys))
    kills, restarts = res.get("kills", {}), res.get("restarts", {})
    lines.append(f"  {'kills / restarts':28} " + ", ".join(f"{k} {kills.get(k, 0)}/{restarts.get(k, 0)}"
                                                            for k in KILLABLE))
    sr = res.get("serving_rows", {})
    if sr.get("tables"):
        lines.append(f"  {'serving PS vs trainer rows':28} " + "; ".join(
            f"{t}: {v['equal']}/{v['sampled']} sampled rows equal, {v['serving_rows']:,} vs {v['trainer_rows']:,} rows"
            for t, v in sr["tables"].items()) + f" (snapshot step {sr.get('snapshot_step')})")
    else:
        lines.append(f"  {'serving PS vs trainer rows':28} not compared: {sr.get('why')}")
    up = res.get("up_at_end", {})
    lines.append(f"  {'up at the end':28} " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in up.items())
                 + (f"; exited by themselves: {res['unexpected_exits']}" if res.get("unexpected_exits") else "")
                 + ("" if res.get("drained") else "; NOT DRAINED in time"))
    rss = res.get("rss_mb") or {}
    if rss:
        lines.append(f"  {'memory (RSS MB, first/last)':28} " + ", ".join(
            f"{k} {v['first']:.0f}/{v['last']:.0f}" for k, v in rss.items()))
    failed = [k for k, v in res.get("checks", {}).items() if not v]
    lines.append(f"  {'verdict':28} {'PASS' if res.get('ok') else 'FAIL: ' + ', '.join(failed)}")
    return "\n".join(lines)

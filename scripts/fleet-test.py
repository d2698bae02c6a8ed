#!/usr/bin/env python3
"""Fleet test: worker-orcd replicas behind LiteLLM's proxy, on the CPU.

Three `serve` replicas of SmolLM2-135M on loopback, configured only through
WORKER_ORCD_* environment variables, form one model group in LiteLLM's proxy
(least-busy routing, retries). The official `openai` client runs 24
concurrent streaming chat clients against the proxy for 60 s; 20 s in, one
replica is SIGKILLed, 35 s in another gets SIGTERM and drains.

Asserted:
  * every request either completes with a final chunk (finish_reason) or was
    cut mid-stream by the SIGKILL (started before it, cut at it; the router
    cannot retry a stream it has already relayed); no request fails before
    its first chunk (the router retries those on a live replica);
  * the draining replica finishes its streams (no job of it ends CANCELLED)
    and exits 0;
  * while all three run, each serves at least 20% of the requests.
Then, with no failures injected, throughput and TTFT p50/p99 with 1, 2 and
3 replicas (20 s each) are measured and printed.

Usage: fleet-test.py --binary target/debug/worker-orcd --model SmolLM2.gguf
       [--litellm target/fleetenv/bin/litellm] [--duration 60] [--json out.json]
"""

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import openai

MODEL_GROUP = "smollm"
# The gateway's key (clients use it) and the replicas' (the gateway uses it).
GATEWAY_KEY = "sk-fleet-" + os.urandom(16).hex()
WORKER_KEY = "worker-" + os.urandom(16).hex()
# A short system prompt (SmolLM2's template otherwise adds a long default
# one): the CPU replicas' time goes to generation, not to prefill.
SYSTEM = "Be brief."
PROMPTS = [
    "Count from 1 to 10.",
    "Name three colours.",
    "Say hello in French.",
    "What is 2 + 2?",
]


def log(*args):
    print("fleet-test:", *args, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, json.loads(response.read())


def get_text(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


class Replica:
    """One `serve` process, configured through the environment only."""

    def __init__(self, name, binary, model, drain_timeout):
        self.name = name
        self.log_path = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False).name
        env = dict(os.environ)
        env.update(
            WORKER_ORCD_MODEL=model,
            WORKER_ORCD_PORT="0",
            WORKER_ORCD_CTX_SIZE="1024",
            WORKER_ORCD_MAX_CONCURRENT="8",
            WORKER_ORCD_MAX_QUEUE="32",
            WORKER_ORCD_THREADS="1",
            WORKER_ORCD_DRAIN_TIMEOUT=str(drain_timeout),
            WORKER_ORCD_LOG_FORMAT="json",
            WORKER_ORCD_WORKER_ID=name,
            WORKER_ORCD_API_KEY=WORKER_KEY,
        )
        self.log_file = open(self.log_path, "w")
        self.process = subprocess.Popen([binary, "serve"], env=env, stderr=self.log_file, stdout=subprocess.DEVNULL)
        self.uri = None
        self.last_jobs = {}
        self.accepted = 0

    def wait_ready(self, limit=120):
        start = time.time()
        while time.time() - start < limit:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {open(self.log_path).read()}")
            if self.uri is None:
                for line in open(self.log_path):
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    uri = entry.get("fields", {}).get("uri")
                    if uri:
                        self.uri = uri
            if self.uri is not None:
                try:
                    status, body = get_json(self.uri + "/ready")
                    if status == 200:
                        return
                except Exception:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {limit} s")

    def scrape(self):
        """From /metrics: jobs finished by stop reason, and chat streams
        accepted (200 responses); kept from the last successful scrape."""
        try:
            text = get_text(self.uri + "/metrics")
        except Exception:
            return self.last_jobs
        jobs = {}
        for line in text.splitlines():
            m = re.match(r'worker_orcd_jobs_total\{api="openai",stop_reason="(\w+)"\} (\d+)', line)
            if m:
                jobs[m.group(1)] = int(m.group(2))
            m = re.match(r'worker_orcd_http_requests_total\{route="/v1/chat/completions",status="200"\} (\d+)', line)
            if m:
                self.accepted = int(m.group(1))
        self.last_jobs = jobs
        return jobs

    def in_flight(self):
        """Jobs running or queued now, from /load (0 when it does not answer)."""
        try:
            _, load = get_json(self.uri + "/load")
            return load["running"] + load["queued"]
        except Exception:
            return 0

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log_file.close()


class Gateway:
    """LiteLLM's proxy with the replicas as one model group."""

    def __init__(self, litellm, replicas):
        self.port = free_port()
        config = {
            "model_list": [
                {
                    "model_name": MODEL_GROUP,
                    "litellm_params": {
                        "model": "openai/SmolLM2-135M-Instruct.Q4_1",
                        "api_base": r.uri + "/v1",
                        "api_key": WORKER_KEY,
                        "timeout": 120,
                        "stream_timeout": 120,
                    },
                }
                for r in replicas
            ],
            "router_settings": {
                "routing_strategy": "least-busy",
                # A killed and a draining replica can each take two
                # attempts (allowed_fails 1) before their cooldown, and
                # least-busy routing favours the draining one: 5 retries
                # always reach a live replica.
                "num_retries": 5,
                "retry_after": 0,
                "allowed_fails": 1,
                "cooldown_time": 60,
            },
            "litellm_settings": {"request_timeout": 120, "num_retries": 5},
            "general_settings": {"master_key": GATEWAY_KEY},
        }
        self.config_path = tempfile.NamedTemporaryFile(prefix="litellm-", suffix=".json", delete=False).name
        with open(self.config_path, "w") as f:
            json.dump(config, f)  # JSON is YAML
        self.log_path = tempfile.NamedTemporaryFile(prefix="litellm-", suffix=".log", delete=False).name
        self.log_file = open(self.log_path, "w")
        env = dict(os.environ, LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False", DISABLE_SCHEMA_UPDATE="True")
        self.process = subprocess.Popen(
            [litellm, "--config", self.config_path, "--host", "127.0.0.1", "--port", str(self.port), "--num_workers", "1"],
            env=env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, limit=180):
        start = time.time()
        while time.time() - start < limit:
            if self.process.poll() is not None:
                raise RuntimeError(f"litellm exited: {open(self.log_path).read()[-4000:]}")
            try:
                status, _ = get_json(f"http://127.0.0.1:{self.port}/health/liveliness")
                if status == 200:
                    return time.time() - start
            except Exception:
                pass
            time.sleep(0.5)
        raise RuntimeError("litellm not ready")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log_file.close()


class Outcome:
    def __init__(self, started):
        self.started = started
        self.ttft = None
        self.ended = None
        self.finish_reason = None
        self.chunks = 0
        self.error = None
        self.error_after_first_chunk = False


async def one_request(client, prompt, max_tokens):
    outcome = Outcome(time.time())
    try:
        stream = await client.chat.completions.create(
            model=MODEL_GROUP,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        )
        async for chunk in stream:
            if outcome.ttft is None and chunk.choices and chunk.choices[0].delta.content:
                outcome.ttft = time.time() - outcome.started
            outcome.chunks += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                outcome.finish_reason = chunk.choices[0].finish_reason
    except Exception as e:  # what the router surfaces
        outcome.error = f"{type(e).__name__}: {str(e)[:200]}"
        outcome.error_after_first_chunk = outcome.chunks > 0
    outcome.ended = time.time()
    return outcome


async def clients(base_url, concurrency, duration, max_tokens, ramp=0.25):
    client = openai.AsyncOpenAI(base_url=base_url, api_key=GATEWAY_KEY, max_retries=0, timeout=120)
    deadline = time.time() + duration
    outcomes = []

    async def worker(i):
        # Clients arrive over a few seconds, as users do; a burst of requests
        # in the same millisecond all see the same in-flight counts in the
        # router (least-busy counts a request once its call has started).
        await asyncio.sleep(i * ramp)
        n = i
        while time.time() < deadline:
            outcomes.append(await one_request(client, PROMPTS[n % len(PROMPTS)], max_tokens))
            n += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    await client.close()
    return outcomes


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    k = max(0, min(len(values) - 1, round(p / 100 * (len(values) - 1))))
    return values[k]


def summary(outcomes, duration):
    done = [o for o in outcomes if o.error is None and o.finish_reason]
    ttfts = [o.ttft for o in done if o.ttft is not None]
    return {
        "requests": len(outcomes),
        "completed": len(done),
        "requests_per_s": round(len(done) / duration, 2),
        "ttft_p50_s": round(percentile(ttfts, 50), 3) if ttfts else None,
        "ttft_p99_s": round(percentile(ttfts, 99), 3) if ttfts else None,
    }


async def failure_run(args, replicas, gateway):
    killed, drained, survivor = replicas
    kill_at, term_at = 20.0, 35.0
    t0 = time.time()
    before_kill = {}
    in_flight = {}

    async def inject():
        await asyncio.sleep(kill_at)
        for r in replicas:
            r.scrape()
            before_kill[r.name] = r.accepted
        in_flight["killed"] = killed.in_flight()
        log(f"SIGKILL {killed.name} at {time.time() - t0:.1f} s with {in_flight['killed']} jobs in flight")
        killed.process.send_signal(signal.SIGKILL)
        await asyncio.sleep(term_at - kill_at)
        drained.scrape()
        log(f"SIGTERM {drained.name} at {time.time() - t0:.1f} s")
        drained.process.send_signal(signal.SIGTERM)
        # Scrape the draining replica until it exits, keeping its last counts.
        while drained.process.poll() is None:
            drained.scrape()
            await asyncio.sleep(0.25)

    task = asyncio.create_task(inject())
    outcomes = await clients(gateway.base_url, args.concurrency, args.duration, args.max_tokens)
    await task
    survivor.scrape()
    return outcomes, t0 + kill_at, before_kill, in_flight["killed"]


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--litellm", default=os.path.join(os.path.dirname(sys.executable), "litellm"))
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--scaling-duration", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()

    report = {}
    failures = []
    replicas = [Replica(f"replica-{i}", args.binary, args.model, drain_timeout=45) for i in range(3)]
    gateway = None
    try:
        for r in replicas:
            r.wait_ready()
        log("replicas ready:", ", ".join(r.uri for r in replicas))
        gateway = Gateway(args.litellm, replicas)
        log(f"litellm ready in {gateway.wait_ready():.1f} s on {gateway.base_url}")
        # Warm up every replica's path through the proxy.
        await clients(gateway.base_url, 3, 2, 2)

        outcomes, kill_time, before_kill, killed_in_flight = await failure_run(args, replicas, gateway)
        killed, drained, survivor = replicas
        cut = [o for o in outcomes if o.error and o.error_after_first_chunk]
        failed_early = [o for o in outcomes if o.error and not o.error_after_first_chunk]
        unfinished = [o for o in outcomes if o.error is None and not o.finish_reason]
        completed = [o for o in outcomes if o.error is None and o.finish_reason]
        report["failure_run"] = {
            **summary(outcomes, args.duration),
            "cut_mid_stream_by_sigkill": len(cut),
            "failed_before_first_chunk": len(failed_early),
            "ended_without_final_chunk": len(unfinished),
            "jobs_in_flight_on_the_killed_replica": killed_in_flight,
            "streams_accepted_per_replica_before_kill": before_kill,
            "drained_replica_jobs": drained.last_jobs,
            "drained_replica_exit_code": drained.process.returncode,
            "survivor_jobs": survivor.last_jobs,
        }
        log("failure run:", json.dumps(report["failure_run"]))
        for o in failed_early:
            failures.append(f"a request failed before its first chunk (not retried by the router): {o.error}")
        for o in unfinished:
            failures.append("a stream ended without a final chunk and without an error")
        for o in cut:
            if not (o.started < kill_time and kill_time - 1 <= o.ended <= kill_time + 10):
                failures.append(f"a stream was cut away from the SIGKILL ({o.started - kill_time:+.1f} s .. {o.ended - kill_time:+.1f} s): {o.error}")
        # A stream the router has started relaying cannot be moved: those in
        # flight on the killed replica (running or queued) are cut, no others.
        if len(cut) > killed_in_flight + 2:
            failures.append(f"{len(cut)} streams cut, but {killed_in_flight} were in flight on the killed replica")
        if drained.process.returncode != 0:
            failures.append(f"the drained replica exited with {drained.process.returncode}")
        if drained.last_jobs.get("CANCELLED", 0) != 0:
            failures.append(f"the drained replica cancelled jobs: {drained.last_jobs}")
        total_before = sum(before_kill.values())
        for name, n in before_kill.items():
            if total_before == 0 or n < 0.2 * total_before:
                failures.append(f"{name} accepted {n} of {total_before} streams before the kill (< 20%)")
        if len(completed) == 0:
            failures.append("nothing completed")
        gateway.stop()
        for r in replicas:
            r.stop()

        # Scaling: 1, 2, 3 replicas, no failures.
        report["scaling"] = {}
        for n in (1, 2, 3):
            group = [Replica(f"scale{n}-{i}", args.binary, args.model, drain_timeout=5) for i in range(n)]
            try:
                for r in group:
                    r.wait_ready()
                gateway = Gateway(args.litellm, group)
                gateway.wait_ready()
                await clients(gateway.base_url, 3, 2, 2)
                outcomes = await clients(gateway.base_url, args.concurrency, args.scaling_duration, args.max_tokens)
                result = summary(outcomes, args.scaling_duration)
                result["errors"] = sum(1 for o in outcomes if o.error)
                report["scaling"][str(n)] = result
                log(f"{n} replica(s):", json.dumps(result))
                if result["errors"]:
                    failures.append(f"{result['errors']} errors with {n} replicas and no failure injected")
            finally:
                if gateway:
                    gateway.stop()
                for r in group:
                    r.stop()
    finally:
        if gateway:
            gateway.stop()
        for r in replicas:
            r.stop()

    report["failures"] = failures
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print()
    print("fleet test: replicas  requests/s  TTFT p50 s  TTFT p99 s")
    for n, r in report.get("scaling", {}).items():
        print(f"            {n:>8}  {r['requests_per_s']:>10}  {r['ttft_p50_s']!s:>10}  {r['ttft_p99_s']!s:>10}")
    if failures:
        for f in failures:
            log("FAIL:", f)
        sys.exit(1)
    log("PASS")


if __name__ == "__main__":
    asyncio.run(main())

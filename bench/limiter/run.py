#!/usr/bin/env python3
"""Limiter cost per request: the same request through the module with
llm_limits off, local (shared zone) and redis (a real redis-server on
loopback), everything else equal.

The request is authenticated, parsed, tokenized, admitted by the limiter
(limits high enough never to refuse), then refused by the engine client
with 503 because no engine runs: so it measures the module's own work
around the limiter (admission + release, headers) without any model time.
One nginx worker; loadgen (bench/limiter/loadgen.c) drives it with 1
connection (latency) and 16 connections (throughput).

    python3 bench/limiter/run.py [--build build] [--seconds 5]

Prints a markdown table (bench/RESULTS-limits.md records one).
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
KEY = "sk-bench-limiter-0000000000000000"

CONF = """
load_module {module};
worker_processes 1;
error_log {d}/error.log error;
pid {d}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp;
    llm_engine unix:{d}/no-engine.sock;
    llm_model smollm2 {model};
    llm_tenants {d}/tenants.json;
    {extra}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location /v1/ {{ llm_api openai; }}
    }}
}}
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("port %d not listening" % port)


def cpu_seconds(pid):
    """user + system CPU time of a process."""
    with open("/proc/%d/stat" % pid) as f:
        st = f.read().rsplit(")", 1)[1].split()
    return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")


def worker_pid(master):
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with open("/proc/%d/task/%d/children" % (master, master)) as f:
            kids = f.read().split()
        if kids:
            return int(kids[0])
        time.sleep(0.05)
    raise RuntimeError("no nginx worker")


def run_loadgen(loadgen, port, conns, seconds, reqfile):
    out = subprocess.run([loadgen, "127.0.0.1", str(port), str(conns),
                          str(seconds), reqfile], capture_output=True,
                         text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    f = out.stdout.split()
    res = {f[i]: f[i + 1] for i in range(0, len(f) - 1, 2)
           if f[i] != "status"}
    res["status"] = re.findall(r"status (\d+):(\d+)", out.stdout)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.environ.get("BUILD", "build"))
    ap.add_argument("--seconds", type=float, default=5)
    args = ap.parse_args()

    build = os.path.join(REPO, args.build)
    module = os.path.join(build, "ngx_http_llm_module.so")
    model = subprocess.run([os.path.join(REPO, "tools", "default-model.sh")],
                           capture_output=True, text=True).stdout.strip()
    if not os.path.exists(module) or not model:
        sys.exit("need %s and the default model" % module)

    d = tempfile.mkdtemp(prefix="bench-limiter-")
    loadgen = os.path.join(d, "loadgen")
    subprocess.run(["gcc", "-O2", "-o", loadgen,
                    os.path.join(REPO, "bench", "limiter", "loadgen.c")],
                   check=True)

    with open(os.path.join(d, "tenants.json"), "w") as f:
        json.dump({"tenants": [{"name": "bench", "keys": [KEY], "limits": {
            "requests_per_minute": 100000000,
            "tokens_per_minute": 100000000000,
            "max_concurrent": 1000000}}]}, f)

    body = json.dumps({"model": "smollm2", "max_tokens": 1, "messages": [
        {"role": "user", "content": "Hello, how are you?"}]})
    reqfile = os.path.join(d, "request")
    with open(reqfile, "w") as f:
        f.write("POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n"
                "Authorization: Bearer %s\r\n"
                "Content-Type: application/json\r\n"
                "Content-Length: %d\r\n\r\n%s" % (KEY, len(body), body))

    rport = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(rport), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly",
                              "no", "--dir", d],
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    wait_port(rport)

    configs = [
        ("off", "llm_limits off;"),
        ("local", "llm_limits local;"),
        ("redis", "llm_limits redis; llm_redis 127.0.0.1:%d;" % rport),
    ]
    rows = []
    try:
        for name, extra in configs:
            nd = os.path.join(d, name)
            os.makedirs(os.path.join(nd, "tmp"))
            shutil.copy(os.path.join(d, "tenants.json"), nd)
            port = free_port()
            conf = os.path.join(nd, "nginx.conf")
            with open(conf, "w") as f:
                f.write(CONF.format(module=module, d=nd, model=model,
                                    port=port, extra=extra))
            ng = subprocess.Popen(["/usr/sbin/nginx", "-p", nd, "-c", conf,
                                   "-g", "daemon off;"])
            try:
                wait_port(port)
                run_loadgen(loadgen, port, 4, 1, reqfile)       # warm up
                lat = run_loadgen(loadgen, port, 1, args.seconds, reqfile)
                wpid = worker_pid(ng.pid)
                w0, r0 = cpu_seconds(wpid), cpu_seconds(redis.pid)
                thr = run_loadgen(loadgen, port, 16, args.seconds, reqfile)
                n = int(thr["requests"])
                thr["worker_us"] = (cpu_seconds(wpid) - w0) * 1e6 / n
                thr["redis_us"] = (cpu_seconds(redis.pid) - r0) * 1e6 / n
            finally:
                ng.send_signal(signal.SIGQUIT)
                ng.wait(30)
            for r in (lat, thr):
                codes = dict(r["status"])
                assert set(codes) == {"503"}, r["status"]
            rows.append((name, lat, thr))
    finally:
        redis.terminate()
        redis.wait(10)

    base_lat = float(rows[0][1]["p50_us"])
    base_cpu = rows[0][2]["worker_us"]
    print("| llm_limits | 1 conn: mean / p50 / p99 latency (us) "
          "| 16 conns: req/s | nginx worker CPU per request (us) "
          "| redis-server CPU per request (us) "
          "| limiter cost: p50 latency / worker CPU (us) |")
    print("|---|---|---|---|---|---|")
    for name, lat, thr in rows:
        print("| %s | %.1f / %.1f / %.1f | %s | %.1f | %.1f | %+.1f / %+.1f |"
              % (name, float(lat["mean_us"]), float(lat["p50_us"]),
                 float(lat["p99_us"]), thr["rps"], thr["worker_us"],
                 thr["redis_us"], float(lat["p50_us"]) - base_lat,
                 thr["worker_us"] - base_cpu))
    print()
    print("machine: %s, %d cores; %s; %s; load average %s" % (
        cpu_name(), os.cpu_count(), platform.platform(),
        time.strftime("%Y-%m-%d %H:%M"),
        open("/proc/loadavg").read().split()[0]))
    shutil.rmtree(d, ignore_errors=True)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()

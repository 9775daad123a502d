#!/usr/bin/env python3
"""Load test for `meshlm serve` on loopback (not CI): C concurrent clients send R requests each
(non-streamed /v1/completions, fixed max_tokens, distinct prompts), and it reports errors, p50/p99
latency and total generated tokens/s. Run it against a server started with --parallel P:

  build/meshlm serve -m MODEL.gguf --port 8080 --parallel 8 -t 2 &
  python3 tests/bench/serve_load.py --url http://127.0.0.1:8080 --clients 32 --requests 4 --max-tokens 64
"""
import argparse, json, threading, time, urllib.request, urllib.error


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--url', default='http://127.0.0.1:8080')
    ap.add_argument('--clients', type=int, default=32)
    ap.add_argument('--requests', type=int, default=4, help='per client')
    ap.add_argument('--max-tokens', type=int, default=64)
    ap.add_argument('--key', default=None)
    ap.add_argument('--json', action='store_true')
    a = ap.parse_args()
    words = ['Once upon a time', 'The little dog', 'One day, Lily', 'Tom had a red ball', 'The sun was',
             'Mom said', 'In the park', 'A big bird']
    lat, toks, errors = [], [0], []
    lock = threading.Lock()

    def client(ci):
        for k in range(a.requests):
            body = json.dumps({'prompt': f'{words[(ci + k) % len(words)]} {ci} {k}', 'max_tokens': a.max_tokens,
                               'temperature': 0.8, 'seed': ci * 1000 + k, 'ignore_eos': True}).encode()
            req = urllib.request.Request(a.url + '/v1/completions', data=body,
                                         headers={'Content-Type': 'application/json'})
            if a.key:
                req.add_header('Authorization', 'Bearer ' + a.key)
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    d = json.load(r)
                dt = time.monotonic() - t0
                with lock:
                    lat.append(dt)
                    toks[0] += d['usage']['completion_tokens']
            except (urllib.error.URLError, OSError, ValueError) as e:
                with lock:
                    errors.append(str(e))

    t0 = time.monotonic()
    th = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    wall = time.monotonic() - t0
    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float('nan')
    out = {'clients': a.clients, 'requests': a.clients * a.requests, 'errors': len(errors),
           'p50_s': round(pct(0.50), 3), 'p99_s': round(pct(0.99), 3), 'wall_s': round(wall, 2),
           'tokens': toks[0], 'tokens_per_s': round(toks[0] / wall, 1)}
    if a.json:
        print(json.dumps(out))
    else:
        print(' '.join(f'{k}={v}' for k, v in out.items()))
    if errors:
        print('first error:', errors[0])


if __name__ == '__main__':
    main()

#!/usr/bin/env bash
# Seeds the registry-record fuzzer's corpus ($1) with valid records (as meshlm writes them) and near misses.
set -euo pipefail
corpus="$1"
mkdir -p "$corpus"
printf '%s' '{"v":1,"id":"w1","role":"standby","endpoint":"tcp://127.0.0.1:5871","state":"idle","seq":3,"beat_ms":1796168747749,"joined_ms":1796168746370,"ttl_ms":3000,"pid":24870,"host":"vm","profile":{"cores":2,"mem_budget":0,"mem_bw":7216765029,"disk_bw":4086136701,"gflops":{"Q4_0":38.545425130815829,"Q8_0":13.852424463866006,"Q4_K":29.597483097553859,"Q6_K":24.033162729342514,"F16":12.516240829813318},"model":{"sha256":"270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d","size":1185376}}}' > "$corpus/standby"
printf '%s' '{"v":1,"id":"worker-12","role":"worker","endpoint":"ipc:///tmp/w0","state":"serving","seq":1,"beat_ms":5,"joined_ms":5,"ttl_ms":600,"pid":1,"host":"a","age_ms":17,"profile":{"cores":1,"mem_budget":1073741824,"mem_bw":0,"disk_bw":0,"gflops":{},"model":null}}' > "$corpus/worker"
printf '%s' '{"v":2,"id":"c","role":"coordinator","endpoint":"","state":"lost","seq":9007199254740992,"beat_ms":0,"joined_ms":0,"ttl_ms":86400000,"extra":{"a":[1,2,{"b":null}]},"profile":{"cores":1048576,"mem_budget":0,"mem_bw":0,"disk_bw":0,"gflops":{"q8_0":1e9,"BF16":0.5,"Q9_9":3}}}' > "$corpus/later"
printf '%s' '{"v":1,"id":"n","role":"worker","endpoint":"","state":"idle","seq":1.5,"beat_ms":5,"joined_ms":5,"ttl_ms":10,"profile":{"cores":1,"mem_budget":0,"mem_bw":0,"disk_bw":0,"gflops":{"Q4_0":1,"q4_0":2}}}' > "$corpus/bad"
exit 0

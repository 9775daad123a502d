#!/usr/bin/env bash
# Seeds the fault-spec fuzzer's corpus ($1) with valid specs (leading byte 1 = spec text).
set -euo pipefail
corpus="$1"
mkdir -p "$corpus"
i=0
for spec in "delay:link=0-1:ms=40:jitter=5,bw:link=*:mbit=100,drop:link=1-3:p=0.05,kill:worker=2:after_tokens=5,seed=7" \
            "loss:link=2-*:p=0.01:rto_ms=200" "freeze:worker=1:after_tokens=3:ms=500,partition:link=0-2:after_tokens=9" \
            "delay:link=*:ms=1,bw:link=*:mbit=1000" \
            "kill:worker=3:at_ms=1500,freeze:worker=*:after_tokens=3:ms=250,partition:link=0-2:after_tokens=9:ms=800" \
            "slow:worker=1:factor=2.5,slow:worker=2:factor=4:after_tokens=2:ms=500,disk:worker=2:slow=3,disk:worker=*:full" \
            "drop:link=1-2:p=0.05:at_ms=0,delay:link=*:ms=5:after_tokens=40:for_ms=200,board=/tmp/meshlm-board-x,seed=3" \
            "kill:worker=3:after_tokens=4,freeze:worker=2:after_tokens=13:ms=1200,partition:link=0-1:after_tokens=22:ms=1200,drop:link=1-2:p=0.05:at_ms=0,seed=1"; do
  printf '\001%s' "$spec" > "$corpus/seed-$i"
  i=$((i + 1))
done
exit 0

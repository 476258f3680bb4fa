#!/usr/bin/env bash
# On the offline GPU box: stash the payload parts this call carried (.gpu/N/, from bench/gpu_payload.py) under
# /root/pk; once every part is there, check the sha256, unpack and install into /root/pk/site. Idempotent.
# Then: export PYTHONPATH=/root/pk/site:$PWD
set -euo pipefail
PK=${PRUNEKIT_PAYLOAD:-/root/pk}
mkdir -p "$PK/parts"
for d in .gpu/*/; do
    [ -d "$d" ] && cp -n "$d"/payload.tar.part-* "$d"/manifest.json "$PK/parts/" 2>/dev/null || true
done
if [ -f "$PK/site/.ready" ]; then echo "payload ready in $PK/site"; exit 0; fi
[ -f "$PK/parts/manifest.json" ] || { echo "no payload part carried yet (.gpu/N/)"; exit 3; }
want=$(python3 -c "import json; print(json.load(open('$PK/parts/manifest.json'))['parts'])")
have=$(ls "$PK"/parts/payload.tar.part-* 2>/dev/null | wc -l)
if [ "$have" -lt "$want" ]; then echo "payload: $have of $want parts stashed in $PK/parts"; exit 0; fi
sum=$(cat "$PK"/parts/payload.tar.part-* | sha256sum | cut -d' ' -f1)
expected=$(python3 -c "import json; print(json.load(open('$PK/parts/manifest.json'))['sha256'])")
[ "$sum" = "$expected" ] || { echo "payload: sha256 mismatch ($sum != $expected)"; exit 4; }
rm -rf "$PK/unpack" && mkdir -p "$PK/unpack" "$PK/site"
cat "$PK"/parts/payload.tar.part-* | tar x -C "$PK/unpack"
cp -r "$PK"/unpack/site/. "$PK/site/"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PK/site" \
    "$PK"/unpack/wheels/*.whl
touch "$PK/site/.ready"
echo "payload ready in $PK/site"

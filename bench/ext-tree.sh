#!/usr/bin/env bash
# Issue 16's many-files target: `dio cp -r` of a tree of 100 directories of 100
# files (127 MiB) into an existing ext4 image (4 KiB blocks, with and without a
# journal), alternated with the references, each timed from start to durable:
#   debugfs -w -f CMDFILE  (mkdir + write commands; the image was made before)
#   loop mount             (mount, cp -a, umount; the image was made before)
#   mke2fs -d              (builds a whole image: mkfs included)
# Prints the median of the pairwise ratios reference_time / dio_time (above 1:
# dio is faster). Needs root (loop mount), e2fsprogs. Usage:
#   bench/ext-tree.sh [ROUNDS] [DIR]     (default 3 rounds, scratch in target/ext-tree)
# JOURNAL=0 for images without a journal (default: with).
set -euo pipefail
ROUNDS=${1:-3}
W=${2:-$(cd "$(dirname "$0")/.." && pwd)/target/ext-tree}
DIO=${DIO:-$(cd "$(dirname "$0")/.." && pwd)/target/release/dio}
JOURNAL=${JOURNAL:-1}
FEAT=$([ "$JOURNAL" = 1 ] && echo has_journal || echo ^has_journal)
mkdir -p "$W"
TREE=$W/tree IMG=$W/img MNT=$W/mnt
cleanup() { mountpoint -q "$MNT" 2>/dev/null && umount "$MNT"; rm -rf "$TREE" "$IMG" "$W/cmds"; }
trap cleanup EXIT
if [ ! -d "$TREE" ]; then
  python3 - "$TREE" <<'PY'
import os, sys, random
root = sys.argv[1]; r = random.Random(16)
total = 0
for d in range(100):
    os.makedirs(f"{root}/d{d:02}")
    for f in range(100):
        n = r.randint(1, 26 * 1024)  # about 13 KiB on average: 127 MiB in all
        with open(f"{root}/d{d:02}/f{f:03}", "wb") as fh:
            fh.write(os.urandom(n))
        total += n
print(f"tree: 10000 files, {total / 2**20:.0f} MiB", file=sys.stderr)
PY
fi
mkdir -p "$MNT"
( cd "$TREE" && for d in d*; do echo "mkdir /$d"; for f in "$d"/*; do echo "write $TREE/$f /$f"; done; done ) > "$W/cmds"
mkimg() { rm -f "$IMG"; mkfs.ext4 -q -F -b 4096 -O "$FEAT" "$IMG" 1G >/dev/null; sync; }
now() { date +%s.%N; }
t_dio() { mkimg; local s; s=$(now); "$DIO" cp -r "$TREE/." "$IMG:/" --no-progress 2>/dev/null; now_e=$(now); echo "$now_e - $s" | bc; }
t_debugfs() { mkimg; local s; s=$(now); debugfs -w -f "$W/cmds" "$IMG" >/dev/null 2>&1; sync "$IMG"; now_e=$(now); echo "$now_e - $s" | bc; }
t_loop() { mkimg; local s; s=$(now); mount -o loop "$IMG" "$MNT"; cp -a "$TREE/." "$MNT/"; umount "$MNT"; now_e=$(now); echo "$now_e - $s" | bc; }
t_mke2fs() { rm -f "$IMG"; sync; local s; s=$(now); mkfs.ext4 -q -F -b 4096 -O "$FEAT" -d "$TREE" "$IMG" 1G >/dev/null; sync "$IMG"; now_e=$(now); echo "$now_e - $s" | bc; }
check() { e2fsck -fn "$IMG" >/dev/null 2>&1 || { echo "e2fsck found errors after $1" >&2; exit 1; }; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
declare -A R
for ((i = 1; i <= ROUNDS; i++)); do
  for ref in debugfs loop mke2fs; do
    d=$(t_dio); check dio
    r=$(t_$ref); check "$ref"
    ratio=$(echo "scale=3; $r / $d" | bc)
    echo "round $i: dio ${d}s, $ref ${r}s: ratio $ratio" >&2
    R[$ref]+="$ratio "
  done
done
echo "journal: $FEAT; $ROUNDS rounds; ratio = reference time / dio time (above 1: dio faster)"
for ref in debugfs loop mke2fs; do
  echo "$ref: median $(echo ${R[$ref]} | tr ' ' '\n' | median)x  (${R[$ref]})"
done

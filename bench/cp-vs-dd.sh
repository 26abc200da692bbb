#!/usr/bin/env bash
# dio cp against dd iflag=direct oflag=direct bs=1M, alternated, page cache dropped
# before every run (root). Prints each pair and the median dd/dio time ratio.
# Usage: PAIRS=5 SIZE_MIB=2048 bench/cp-vs-dd.sh [DIR] [-- extra dio cp args]
set -euo pipefail
dir=${1:-target/cp-vs-dd}; shift || true
[ "${1:-}" = "--" ] && shift
pairs=${PAIRS:-5}; size=${SIZE_MIB:-2048}
dio=${DIO:-target/release/dio}
mkdir -p "$dir"
src=$dir/src.bin
if [ ! -f "$src" ] || [ "$(stat -c %s "$src")" != $((size << 20)) ]; then
    echo "making $size MiB source $src" >&2
    dd if=/dev/urandom of="$src" bs=1M count="$size" status=none
fi
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
secs() { local s e; s=$(date +%s.%N); "$@"; e=$(date +%s.%N); echo "$e - $s" | bc; }
ratios=()
for i in $(seq "$pairs"); do
    rm -f "$dir/dd.out" "$dir/dio.out"; drop
    t_dd=$(secs dd if="$src" of="$dir/dd.out" iflag=direct oflag=direct bs=1M status=none)
    rm -f "$dir/dd.out"; drop
    t_dio=$(secs "$dio" cp "$@" "$src" "$dir/dio.out")
    cmp -s "$src" "$dir/dio.out" || { echo "dio cp output differs from source" >&2; exit 1; }
    r=$(echo "scale=3; $t_dd / $t_dio" | bc)
    ratios+=("$r")
    printf 'pair %d: dd %.2f s  dio %.2f s  dd/dio %s\n' "$i" "$t_dd" "$t_dio" "$r"
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "median dd/dio: %.2fx (dio faster above 1)\n", m}'
rm -f "$dir/dio.out"

#!/usr/bin/env bash
# A new large file into an ext4 image (4 KiB blocks): `dio cp SRC IMG:/f` against
# `dio cp SRC host-file`, alternated, page cache dropped before every run (root),
# fresh sparse images each pair. Also times the same copy into an image with a
# journal, and `e2cp` into the image without one. Prints every pair and the
# medians of the pairwise ratios; checks the image with e2fsck -fn and the copy's
# bytes on the last pair; deletes its files at the end.
# FSTYPE=ext2 or ext3 and BLOCK=1024 (or 2048) time files mapped by indirect blocks
# (a table per 256 KiB of file with 1 KiB blocks) instead; "journal" is then the
# same image type with has_journal.
# Usage: PAIRS=3 SIZE_MIB=1024 [FSTYPE=ext4] [BLOCK=4096] bench/ext-bigfile.sh [DIR]
set -euo pipefail
dir=${1:-target/ext-bigfile}
pairs=${PAIRS:-3}; size=${SIZE_MIB:-1024}; fstype=${FSTYPE:-ext4}; block=${BLOCK:-4096}
dio=${DIO:-target/release/dio}
mkdir -p "$dir"
src=$dir/src.bin; raw=$dir/raw.out; img=$dir/nj.img; jimg=$dir/j.img; eimg=$dir/e2cp.img
cleanup() { rm -f "$src" "$raw" "$img" "$jimg" "$eimg"; }
trap cleanup EXIT
echo "making $size MiB source $src" >&2
dd if=/dev/urandom of="$src" bs=1M count="$size" status=none
img_mib=$((size * 2 + 256))
mkimg() { # mkimg FILE [mke2fs -O features]
    rm -f "$1"; truncate -s "${img_mib}M" "$1"
    mke2fs -q -F -t "$fstype" -b "$block" -O "$2" "$1"
}
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
secs() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); echo "$e - $s" | bc; }
have_e2cp=$(command -v e2cp >/dev/null && echo 1 || echo 0)
r_nj=(); r_j=(); r_e2=()
for i in $(seq "$pairs"); do
    mkimg "$img" ^has_journal; mkimg "$jimg" has_journal; mkimg "$eimg" ^has_journal
    rm -f "$raw"; drop
    t_raw=$(secs "$dio" cp --no-progress "$src" "$raw")
    rm -f "$raw"; drop
    t_nj=$(secs "$dio" cp --no-progress "$src" "$img:/f")
    drop
    line=$(printf 'pair %d: raw %.2f s  %s %.2f s (%.2fx)' \
        "$i" "$t_raw" "$fstype-$block" "$t_nj" "$(echo "$t_raw / $t_nj" | bc -l)")
    r_nj+=("$(echo "scale=3; $t_raw / $t_nj" | bc)")
    # cp creates files in journalled images only where the CLI allows it.
    if t_j=$(secs "$dio" cp --no-progress "$src" "$jimg:/f" 2>/dev/null); then
        r_j+=("$(echo "scale=3; $t_raw / $t_j" | bc)")
        line="$line  +journal $(printf '%.2f s (%.2fx)' "$t_j" "$(echo "$t_raw / $t_j" | bc -l)")"
    else
        line="$line  +journal: refused"
    fi
    if [ "$have_e2cp" = 1 ]; then
        drop
        t_e2=$(secs e2cp "$src" "$eimg:/f")
        r_e2+=("$(echo "scale=3; $t_e2 / $t_nj" | bc)")
        line="$line  e2cp $(printf '%.2f' "$t_e2") s"
    fi
    echo "$line"
done
checked=("$img"); [ ${#r_j[@]} -gt 0 ] && checked+=("$jimg")
for f in "${checked[@]}"; do
    e2fsck -fn "$f" >/dev/null 2>&1 || { echo "e2fsck -fn $f failed" >&2; exit 1; }
    "$dio" cat --no-progress "$f:/f" | cmp -s - "$src" || { echo "$f:/f differs from the source" >&2; exit 1; }
done
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2fx", m}'; }
echo "median speed of dio cp into $fstype ($block-byte blocks) / dio cp to a host file: $(med "${r_nj[@]}") (target 0.9x)"
if [ ${#r_j[@]} -gt 0 ]; then
    echo "the same with a journal: $(med "${r_j[@]}")"
else
    echo "with a journal: not measured (this dio cp does not create files in journalled images)"
fi
[ "$have_e2cp" = 1 ] && echo "dio cp into $fstype against e2cp: $(med "${r_e2[@]}") faster"
exit 0

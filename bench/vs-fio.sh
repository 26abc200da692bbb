#!/usr/bin/env bash
# dio against fio on the same workloads: the same file, block size, queue depth and
# runtime, fio with --direct=1 --ioengine=io_uring. Runs alternate (PAIRS pairs per
# workload, dio first in odd pairs and fio first in even ones) so that drift of the
# machine hits both alike; for each workload it prints the median of the pairwise
# ratios dio/fio for IOPS, bandwidth and CPU per I/O (above 1 means dio does more
# I/O, or spends more CPU per I/O).
#
# CPU per I/O is measured the same way for both: the user and system time of the
# whole command (every process and thread it ran, from the shell's `times`) over
# the I/Os it reports. fio's own usr/sys figures leave out its parent process (the
# clock and status thread: about 15% of its CPU at 4k random I/O); they are shown
# per pair as well, next to dio's own figure.
#
# With JOBS=N both run N jobs at once: dio bench --jobs N (a thread and a ring per
# job) against fio --numjobs=N --group_reporting. The issue-20 target:
#   JOBS=2 PAIRS=5 WORKLOADS="randread:4k:64 randwrite:4k:64" bench/vs-fio.sh
#
# Usage: bench/vs-fio.sh [TARGET]
#   TARGET   file or block device (default: target/vs-fio/bench.dat in this repo,
#            created and laid out by the first dio run). Write workloads on a block
#            device run only with ALLOW_WRITE=1 (they destroy its data).
#            `zram`: a scratch RAM block device of SIZE (root; zram is built into most
#            distribution kernels), filled with random bytes, removed at the end. A
#            device that one core cannot saturate: where a disk (a VM's virtual disk
#            here) is the ceiling for both programs, zram shows the submission path's
#            own cost. Its writes run too (the device is scratch).
# Environment: RUNTIME (seconds per run, 3), PAIRS (3), SIZE (256M), ENGINE (uring),
#   JOBS (1),
#   WORKLOADS ("randread:4k:32 randwrite:4k:32 read:1M:8 write:1M:8"),
#   DIO (the dio binary; default: target/release/dio, built if missing),
#   FIXEDBUFS=1 (registered buffers on both sides: dio --fixed-bufs, fio --fixedbufs),
#   BATCH=N (dio --batch N: I/Os submitted per io_uring_enter at most; 1 is one
#   enter per I/O, as fio's default iodepth_batch_submit=1; dio's default is a
#   quarter of the queue depth, fio keeps its default),
#   RAMP=S (seconds each side runs before it measures: dio --ramp S, fio
#   --ramp_time=S; default 0). A VM that sat idle is slower for its first second
#   or so (here: 0.2 s runs right after an idle pause reach 80-88k random-read
#   IOPS where the steady state is 95k), and the two programs start differently
#   (fio spends 0.3 s of CPU setting up before its clock starts, dio about 10 ms):
#   RAMP=1 compares the steady states. CPU per I/O then includes the ramp's CPU on
#   both sides (whole-process times over the counted I/Os): compare it at RAMP=0.
# Needs fio, and python3 or jq. Installs nothing.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNTIME=${RUNTIME:-3}
PAIRS=${PAIRS:-3}
SIZE=${SIZE:-256M}
ENGINE=${ENGINE:-uring}
JOBS=${JOBS:-1}
WORKLOADS=${WORKLOADS:-"randread:4k:32 randwrite:4k:32 read:1M:8 write:1M:8"}
DIO_OPTS=(); FIO_OPTS=()
if [ "${FIXEDBUFS:-0}" = 1 ]; then DIO_OPTS=(--fixed-bufs); FIO_OPTS=(--fixedbufs=1); fi
if [ -n "${BATCH:-}" ]; then DIO_OPTS+=(--batch "$BATCH"); fi
RAMP=${RAMP:-0}
if [ "$RAMP" != 0 ]; then DIO_OPTS+=(--ramp "$RAMP"); FIO_OPTS+=(--ramp_time="$RAMP"); fi
TARGET=${1:-$ROOT/target/vs-fio/bench.dat}

die() { echo "vs-fio: $*" >&2; exit 1; }

command -v fio >/dev/null || die "fio is missing: install it with 'apt-get install fio' (Debian/Ubuntu)"
if command -v python3 >/dev/null; then
  PARSER=python3
elif command -v jq >/dev/null; then
  PARSER=jq
else
  die "python3 or jq is needed to read the JSON results ('apt-get install jq')"
fi

if [ -z "${DIO:-}" ]; then
  DIO=$ROOT/target/release/dio
  if [ ! -x "$DIO" ]; then
    echo "vs-fio: building dio (cargo build --release -p dio-cli)" >&2
    (cd "$ROOT" && cargo build --release -q -p dio-cli)
  fi
fi
[ -x "$DIO" ] || die "no dio binary at $DIO"

WORK=$(mktemp -d "$ROOT/target/vs-fio.XXXXXX" 2>/dev/null || mktemp -d)
ZRAM=
cleanup() {
  rm -rf "$WORK"
  if [ -n "$ZRAM" ]; then
    echo 1 >"/sys/block/zram$ZRAM/reset" 2>/dev/null || true
    echo "$ZRAM" >/sys/class/zram-control/hot_remove 2>/dev/null || true
  fi
}
trap cleanup EXIT

if [ "$TARGET" = zram ]; then
  [ -w /sys/class/zram-control/hot_add ] || die "zram needs root and a kernel with zram (/sys/class/zram-control): 'modprobe zram' where it is a module"
  ZRAM=$(cat /sys/class/zram-control/hot_add) || die "could not add a zram device"
  echo "$SIZE" >"/sys/block/zram$ZRAM/disksize" || die "could not size /dev/zram$ZRAM to $SIZE"
  TARGET=/dev/zram$ZRAM
  # Random bytes: zram stores them as they are, and neither side gets pages it can
  # skip (zero or same-filled ones).
  dd if=/dev/urandom of="$TARGET" bs=1M oflag=direct status=none 2>/dev/null || true
  ALLOW_WRITE=1
fi

DEVICE=0
FORCE=()
if [ -b "$TARGET" ]; then
  DEVICE=1
  if [ "${ALLOW_WRITE:-0}" = 1 ]; then FORCE=(--force); fi
else
  mkdir -p "$(dirname "$TARGET")"
fi

# Print "iops bw_bytes cpu_percent ios" of a dio bench --json result.
dio_numbers() {
  if [ "$PARSER" = python3 ]; then
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["iops"], d["bw_bytes"], d["cpu_usr"]+d["cpu_sys"], d["ios"])' "$1"
  else
    jq -r '"\(.iops) \(.bw_bytes) \(.cpu_usr + .cpu_sys) \(.ios)"' "$1"
  fi
}

# The same for fio's --output-format=json (one job, or the group of --numjobs with
# --group_reporting; reads and writes added). fio's CPU of a group is the mean per
# job: times the jobs, it is the process's, in percent of one core, as dio's is.
fio_numbers() {
  if [ "$PARSER" = python3 ]; then
    python3 -c '
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
job = j["jobs"][0]
iops = job["read"]["iops"] + job["write"]["iops"]
bw = job["read"]["bw_bytes"] + job["write"]["bw_bytes"]
ios = job["read"]["total_ios"] + job["write"]["total_ios"]
print(iops, bw, (job["usr_cpu"] + job["sys_cpu"]) * int(sys.argv[2]), ios)' "$1" "$JOBS"
  else
    sed -n '/^{/,$p' "$1" | jq -r --argjson n "$JOBS" '.jobs[0] | "\(.read.iops + .write.iops) \(.read.bw_bytes + .write.bw_bytes) \((.usr_cpu + .sys_cpu) * $n) \(.read.total_ios + .write.total_ios)"'
  fi
}

# CPU seconds (user + system) this shell's finished children used so far. `times`
# runs in this shell (a command substitution would report a subshell's children).
children_cpu() {
  times >"$WORK/times"
  tail -n 1 "$WORK/times" | awk '{
    t = 0
    for (i = 1; i <= 2; i++) { split($i, p, "m"); sub("s", "", p[2]); t += p[1] * 60 + p[2] }
    printf "%.3f\n", t }'
}

# Run a command, its stdout into file $1, its whole CPU time into $CPU_SPENT.
timed() {
  local out=$1 before after status=0
  shift
  children_cpu >"$WORK/cpu0"
  "$@" >"$out" || status=$?
  children_cpu >"$WORK/cpu1"
  read -r before <"$WORK/cpu0"
  read -r after <"$WORK/cpu1"
  CPU_SPENT=$(awk -v a="$after" -v b="$before" 'BEGIN { printf "%.3f", a - b }')
  return $status
}

median() { sort -g | awk '{v[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }

echo "vs-fio: $TARGET, $SIZE, $RUNTIME s per run after a $RAMP s ramp, $PAIRS pairs per workload, $JOBS job(s), dio engine $ENGINE, fio io_uring" >&2
printf '%-18s %12s %12s %12s %14s %14s\n' workload "IOPS dio/fio" "BW dio/fio" "CPU/IO d/f" "dio IOPS" "fio IOPS" >"$WORK/table"

for spec in $WORKLOADS; do
  IFS=: read -r rw bs qd <<<"$spec"
  case $rw in
    write|randwrite)
      if [ $DEVICE = 1 ] && [ ${#FORCE[@]} = 0 ]; then
        echo "vs-fio: skipping $rw on block device $TARGET (set ALLOW_WRITE=1 to destroy its data)" >&2
        continue
      fi ;;
  esac
  label="$rw $bs qd$qd"
  [ "$JOBS" = 1 ] || label="$label x$JOBS"
  : >"$WORK/ratios"
  run_dio() {
    timed "$WORK/dio.json" "$DIO" bench "$TARGET" --rw "$rw" --bs "$bs" --qd "$qd" --size "$SIZE" \
      --runtime "$RUNTIME" --engine "$ENGINE" --jobs "$JOBS" --json "${FORCE[@]}" "${DIO_OPTS[@]}" \
      || die "dio bench failed ($label)"
    D_SPENT=$CPU_SPENT
  }
  run_fio() {
    timed "$WORK/fio.json" fio --name=vs-fio --filename="$TARGET" --size="$SIZE" --rw="$rw" --bs="$bs" \
      --iodepth="$qd" --runtime="$RUNTIME" --time_based --direct=1 --ioengine=io_uring \
      --norandommap --randrepeat=0 --numjobs="$JOBS" --group_reporting "${FIO_OPTS[@]}" --output-format=json 2>"$WORK/fio.err" \
      || die "fio failed ($label): $(cat "$WORK/fio.err")"
    F_SPENT=$CPU_SPENT
  }
  for pair in $(seq 1 "$PAIRS"); do
    if [ $((pair % 2)) = 1 ]; then run_dio; run_fio; else run_fio; run_dio; fi
    read -r d_iops d_bw d_cpu d_ios < <(dio_numbers "$WORK/dio.json")
    read -r f_iops f_bw f_cpu f_ios < <(fio_numbers "$WORK/fio.json")
    printf 'vs-fio: %s pair %s: dio %.0f IOPS %.2f us CPU/IO (own figure %.1f%% cpu), fio %.0f IOPS %.2f us CPU/IO (own figure %.1f%% cpu)\n' \
      "$label" "$pair" "$d_iops" "$(awk -v c="$D_SPENT" -v n="$d_ios" 'BEGIN { print (n > 0) ? c * 1e6 / n : 0 }')" "$d_cpu" \
      "$f_iops" "$(awk -v c="$F_SPENT" -v n="$f_ios" 'BEGIN { print (n > 0) ? c * 1e6 / n : 0 }')" "$f_cpu" >&2
    awk -v di="$d_iops" -v db="$d_bw" -v dc="$D_SPENT" -v dn="$d_ios" -v fi="$f_iops" -v fb="$f_bw" -v fc="$F_SPENT" -v fn="$f_ios" 'BEGIN {
      iops = (fi > 0) ? di / fi : "nan"; bw = (fb > 0) ? db / fb : "nan";
      cpu = (dn > 0 && fn > 0 && fc > 0) ? (dc / dn) / (fc / fn) : "nan";
      print iops, bw, cpu, di, fi }' >>"$WORK/ratios"
  done
  r_iops=$(cut -d' ' -f1 "$WORK/ratios" | median)
  r_bw=$(cut -d' ' -f2 "$WORK/ratios" | median)
  r_cpu=$(cut -d' ' -f3 "$WORK/ratios" | median)
  m_dio=$(cut -d' ' -f4 "$WORK/ratios" | median)
  m_fio=$(cut -d' ' -f5 "$WORK/ratios" | median)
  printf '%-18s %12.2f %12.2f %12.2f %14.0f %14.0f\n' "$label" "$r_iops" "$r_bw" "$r_cpu" "$m_dio" "$m_fio" >>"$WORK/table"
done

echo
echo "Median of $PAIRS pairwise ratios (dio/fio); CPU/IO (whole process) above 1 means dio spends more CPU per I/O."
cat "$WORK/table"

#!/usr/bin/env bash
# Builds the small base images the ext fuzz target patches (fuzz/seeds/*.img.gz)
# and a starting corpus (one input per base). Needs e2fsprogs and python3.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/dio-fuzz-seeds.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export E2FSPROGS_FAKE_TIME=1700000000
python3 - "$work/src" <<'PY'
import os, sys
root = sys.argv[1]
def w(p, data):
    p = os.path.join(root, p)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    open(p, "wb").write(data)
w("a", b"hello\n")
w("d/e/f", b"x" * 3000)
w("big", bytes(range(256)) * 40)
with open(os.path.join(root, "sparse"), "wb") as f:
    f.write(b"head"); f.seek(40000); f.write(b"tail")
for i in range(40):
    w("many/name-%03d-%s" % (i, "y" * (i % 11)), b"%d" % i)
os.symlink("a", os.path.join(root, "fast"))
os.symlink("d/" + "./" * 40 + "e/f", os.path.join(root, "slow"))
PY
mk() { # name size args...
  local name="$1" size="$2"; shift 2
  mke2fs -q -F -d "$work/src" "$@" "$work/$name.img" "$size"
  e2fsck -fyD "$work/$name.img" >/dev/null 2>&1 || true
  if debugfs -R "stat /big" "$work/$name.img" 2>/dev/null | grep -q EXTENTS; then
    printf 'punch /big 2 2\npunch /big 4 4\npunch /big 6 6\npunch /big 8 8\npunch /big 10 10\nfallocate /sparse 10 12\nsif /sparse size 40004\n' > "$work/cmds"
    debugfs -w -f "$work/cmds" "$work/$name.img" >/dev/null 2>&1
  fi
  e2fsck -fn "$work/$name.img" >/dev/null 2>&1
  gzip -9n < "$work/$name.img" > "$here/seeds/$name.img.gz"
}
mkdir -p "$here/seeds" "$here/corpus/ext_image"
mk ext4-csum 256K -t ext4 -b 1024 -N 64 -O inline_data,metadata_csum,^has_journal
mk ext4-plain 256K -t ext4 -b 1024 -N 64 -O ^metadata_csum,^has_journal,^resize_inode
mk ext2 192K -t ext2 -b 1024 -N 64
mk ext3-2k 3M -t ext3 -b 2048 -N 64
for i in 0 1 2 3; do printf "\\x0$i" > "$here/corpus/ext_image/base-$i"; done
ls -l "$here/seeds"

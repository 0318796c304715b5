#!/usr/bin/env bash
# Build the Siteward SD-card image for the Raspberry Pi 4 (arm64, Debian bookworm; the Pi 5 is not
# supported by bookworm's kernel: docs/appliance.md, "Raspberry Pi 5").
#
#   image/build.sh [--variant release|test] [--initramfs most|list] [--out DIR] [--fresh]
#
# --variant release (the default) is what installers flash; test is what the boot test boots
# (docs/appliance.md, "Release and test builds"). --initramfs overrides the variant's initramfs
# module policy: release builds use MODULES=most (every storage driver: boots from SD, USB mass
# storage, NVMe, on boards this machine cannot try), test builds MODULES=list
# (image/base/initramfs-modules: enough for SD and qemu), which saves 10+ minutes of emulated
# build time per base.
# `--variant test --initramfs most` builds a bootable test image with the release's initramfs.
#
# Stages, each cached (in ~/.cache/siteward-image, or $SITEWARD_IMAGE_CACHE) by a hash of exactly its inputs, so a test run
# rebuilds only what changed (usually just the last, cheap stage):
#   1. base   mmdebstrap of an arm64 bookworm root (qemu-user via binfmt): systemd,
#             python3, linux-image-arm64, raspi-firmware, ...        inputs: package list, base/, hooks/
#   2. wheels Siteward's dependencies as aarch64 wheels, downloaded on this host
#             (pip in the emulated chroot cannot verify the registry's certificate, and
#             downloading here keeps this host's pip settings out of the image) and
#             installed offline into /opt/siteward/venv in a copy of the base
#                                                                 inputs: base, dependency list
#   3. image  Siteward's own wheel, units, rootfs overlay; boot (FAT), root (ext4) and data
#             (ext4) file systems made from directories (mkfs.vfat + mtools, mkfs.ext4 -d),
#             no loop mounts; an MBR laid out with sfdisk     inputs: everything above + the tree
#
# Output in --out (default image/out/): siteward-<version>-arm64.img.xz (release) or
# siteward-<version>-arm64-test.img (test), its .sha256, and vmlinuz/initrd.img for
# qemu-system-aarch64. The variants are described in docs/appliance.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
# outside the work tree by default: CI runs in a fresh clone on the same machine and must find
# the base and the venv that an earlier run built (they take most of the build time)
CACHE="${SITEWARD_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/siteward-image}"
OUT="$HERE/out"
VARIANT=release
INITRAMFS_MODULES=
FRESH=0
PYTHON="${PYTHON:-python3}"
MIRROR="${SITEWARD_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${SITEWARD_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
SUITE=bookworm

# sizes in MiB; the data partition is grown to fill the card on first boot
BOOT_MB=256
ROOT_MB=1536
DATA_MB=128

while [ $# -gt 0 ]; do
    case "$1" in
        --variant) VARIANT="$2"; shift 2 ;;
        --initramfs) INITRAMFS_MODULES="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --fresh) FRESH=1; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$VARIANT" in release|test) ;; *) echo "build.sh: --variant is release or test" >&2; exit 2 ;; esac
case "$INITRAMFS_MODULES" in ''|most|list) ;; *) echo "build.sh: --initramfs is most or list" >&2; exit 2 ;; esac
[ "$(id -u)" -eq 0 ] || { echo "build.sh: run as root (mmdebstrap --mode=root, file ownership in the image)" >&2; exit 1; }

PACKAGES=(
    systemd systemd-sysv systemd-timesyncd systemd-resolved udev dbus kmod iproute2
    linux-image-arm64 raspi-firmware firmware-brcm80211 initramfs-tools
    python3 python3-venv ca-certificates tzdata
    wpasupplicant bluez
    cloud-guest-utils fdisk e2fsprogs dosfstools
    sqlite3 procps less
)
if [ "$VARIANT" = test ]; then
    # the boot test runs commands in the guest through the QEMU guest agent (virtio-serial);
    # a release image has no such channel
    PACKAGES+=(qemu-guest-agent)
    # MODULES=list (image/base/initramfs-modules): the Pi 4's SD driver plus virtio for qemu, ~36 s
    # instead of 10+ min; not enough for USB boot (no sd_mod): docs/appliance.md
    : "${INITRAMFS_MODULES:=list}"
else
    # MODULES=most (Debian's default): the initramfs can mount the root file system from any
    # storage the kernel supports (SD, USB mass storage, NVMe behind PCIe), on boards and adapters
    # we cannot boot here; 10-16 min of emulated build time (measured), paid once per release base
    : "${INITRAMFS_MODULES:=most}"
fi
# the cache entries of a variant built with the other initramfs policy are kept apart, so that
# such a build does not evict the usual base and venv (the cache keeps one of each per flavour)
FLAVOUR="$VARIANT"
if { [ "$VARIANT" = test ] && [ "$INITRAMFS_MODULES" != list ]; } || \
   { [ "$VARIANT" = release ] && [ "$INITRAMFS_MODULES" != most ]; }; then
    FLAVOUR="$VARIANT+$INITRAMFS_MODULES"
fi

log() { printf '[build %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
hash_of() { # hash_of FILE|DIR|-STRING ... : a stable digest of contents (not mtimes)
    local item
    for item in "$@"; do
        if [ -d "$item" ]; then
            (cd "$item" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum)
            (cd "$item" && find . -print0 | LC_ALL=C sort -z | xargs -0 -r stat -c '%n %a')
        elif [ -f "$item" ]; then
            sha256sum < "$item"
        else
            printf '%s\n' "$item"
        fi
    done | sha256sum | cut -c1-16
}
gc_cache() { # keep only the newest $2 entries matching $1
    ls -1dt "$CACHE"/$1 2>/dev/null | tail -n +"$(( $2 + 1 ))" | xargs -r rm -rf
}

VERSION="$(cd "$ROOT" && "$PYTHON" -c 'import tomllib;print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')"
mkdir -p "$CACHE" "$OUT"
T0=$(date +%s)

# ---------------------------------------------------------------------------------------
# 1. base
BASE_KEY="$(hash_of "-$SUITE $MIRROR $VARIANT $INITRAMFS_MODULES ${PACKAGES[*]}" "$HERE/base" "$HERE/hooks")"
BASE="$CACHE/base-$FLAVOUR-$BASE_KEY"
build_base() {
    log "base: mmdebstrap $SUITE arm64 ($VARIANT, initramfs MODULES=$INITRAMFS_MODULES), cache key $BASE_KEY"
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
        update-binfmts --enable qemu-aarch64
    fi
    rm -rf "$BASE.tmp"
    local comps="main non-free-firmware"
    # force-confold: keep the configuration files the setup hook wrote before dpkg runs
    SITEWARD_INITRAMFS_MODULES="$INITRAMFS_MODULES" mmdebstrap --mode=root --arch=arm64 --variant=minbase \
        --include="$(IFS=,; echo "${PACKAGES[*]}")" \
        --dpkgopt='force-confold' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --hook-dir=/usr/share/mmdebstrap/hooks/eatmydata \
        --setup-hook="$HERE/hooks/setup-siteward.sh \"\$1\"" \
        --customize-hook="$HERE/hooks/customize-siteward.sh \"\$1\"" \
        "$SUITE" "$BASE.tmp" \
        "deb $MIRROR $SUITE $comps" \
        "deb $MIRROR $SUITE-updates $comps" \
        "deb $SECURITY_MIRROR $SUITE-security $comps"
    mv "$BASE.tmp" "$BASE"
    gc_cache "base-$FLAVOUR-*" 1
}
if [ "$FRESH" = 1 ] || [ ! -d "$BASE" ]; then build_base; else log "base: cached ($BASE_KEY)"; fi
T_BASE=$(date +%s)

[ "${SITEWARD_STOP_AFTER:-}" = base ] && exit 0

# ---------------------------------------------------------------------------------------
# 2. wheels and the dependency venv
# per build process, like the scratch trees below: a second build on this machine (CI) must not
# remove or replace the wheel this one is installing
OWN="$CACHE/own-wheel-$$"
rm -rf "$OWN" && mkdir -p "$OWN"
trap 'rm -rf "$OWN"' EXIT
# pip's own settings on this host (local indexes, constraints) stay out: PyPI only, its CA bundle
pipx() { PIP_CONFIG_FILE=/dev/null "$PYTHON" -m pip --disable-pip-version-check "$@"; }
PIP_CERT=(); [ -f /etc/ssl/certs/ca-certificates.crt ] && PIP_CERT=(--cert /etc/ssl/certs/ca-certificates.crt)
# the web UI's chart library (npm, pinned by its lock file) must be in the wheel: docs/ui.md
bash "$ROOT/scripts/frontend.sh"
log "wheel: building Siteward $VERSION from the tree"
pipx wheel -q "${PIP_CERT[@]}" --index-url https://pypi.org/simple --no-deps -w "$OWN" "$ROOT" >/dev/null
OWN_WHEEL="$(ls "$OWN"/siteward-*.whl)"
DEPS_KEY="$(hash_of "-$("$PYTHON" -c 'import tomllib;print(tomllib.load(open("'"$ROOT"'/pyproject.toml","rb"))["project"]["dependencies"])')")"
WHEELS="$CACHE/wheels-$DEPS_KEY"
if [ "$FRESH" = 1 ] || [ ! -d "$WHEELS" ]; then
    log "wheels: downloading aarch64 wheels for the dependencies (key $DEPS_KEY)"
    rm -rf "$WHEELS.tmp" && mkdir -p "$WHEELS.tmp"
    # bookworm has glibc 2.36 and CPython 3.11: any manylinux tag up to 2.36 fits.
    # A dependency published only as an sdist cannot be fetched for another platform; when it
    # is pure Python, its wheel (py3-none-any) is built here and the download tried again.
    for attempt in 1 2 3 4 5 6 7 8; do
        if pipx download -q "${PIP_CERT[@]}" --index-url https://pypi.org/simple --only-binary=:all: \
            --find-links "$WHEELS.tmp" \
            --platform manylinux_2_36_aarch64 --platform manylinux_2_28_aarch64 \
            --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 --platform linux_aarch64 \
            --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
            -d "$WHEELS.tmp" "$OWN_WHEEL" 2> "$WHEELS.err"; then
            break
        fi
        missing="$(sed -n 's/.*No matching distribution found for \([A-Za-z0-9_.-]*\).*/\1/p' "$WHEELS.err" | head -n1)"
        [ -n "$missing" ] && [ "$attempt" -lt 8 ] || { cat "$WHEELS.err" >&2; exit 1; }
        req="$(sed -n "s/.*requirement \($missing[^ ]*\) (from.*/\1/p" "$WHEELS.err" | head -n1)"
        log "wheels: $missing has no wheel on the index: building it from its sdist"
        pipx wheel -q "${PIP_CERT[@]}" --index-url https://pypi.org/simple --no-deps -w "$WHEELS.tmp" "${req:-$missing}"
        ls "$WHEELS.tmp" | grep -qi "^${missing//-/_}-.*-none-any.whl$" || {
            echo "build.sh: $missing is not pure Python: it needs an aarch64 wheel" >&2; exit 1; }
    done
    rm -f "$WHEELS.err"
    rm -f "$WHEELS.tmp"/siteward-*.whl
    mv "$WHEELS.tmp" "$WHEELS"
    gc_cache "wheels-*" 2
fi
# bump when the way the venv is made changes
VENV_RECIPE=2
VENV_KEY="$(hash_of "-$BASE_KEY $VENV_RECIPE" "$WHEELS")"
VENV_TAR="$CACHE/venv-$FLAVOUR-$VENV_KEY.tar"
SITE=opt/siteward/venv/lib/python3.11/site-packages
TARGET_PLATFORM=(--only-binary=:all: --platform manylinux_2_36_aarch64 --platform manylinux_2_28_aarch64
    --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 --platform linux_aarch64
    --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none)
install_wheels() { # install_wheels TREE WHEEL...: offline, into the image's venv, by this host's pip
    local tree="$1"; shift
    # pip installs for the target platform into the venv's site-packages; bytecode is compiled
    # here too (CPython 3.11's .pyc format is the same on every architecture). Nothing of it
    # runs under emulation, which took minutes per build.
    pipx install -q --no-index --no-deps --no-compile "${TARGET_PLATFORM[@]}" --target "$tree/$SITE" "$@" >/dev/null
    rm -rf "$tree/$SITE/bin"  # console scripts with this host's interpreter in their #! line
    "$PYTHON" -m compileall -q -j0 "$tree/$SITE" >/dev/null || true
}
if [ "$FRESH" = 1 ] || [ ! -f "$VENV_TAR" ]; then
    log "venv: installing the dependencies offline into the arm64 venv (key $VENV_KEY)"
    scratch="$CACHE/venv-scratch-$$"
    rm -rf "$scratch" && mkdir -p "$scratch"
    # the venv itself is made by the target's python (its pyvenv.cfg and links are the image's)
    cp -a "$BASE" "$scratch/root"
    chroot "$scratch/root" python3 -m venv --without-pip /opt/siteward/venv
    test -d "$scratch/root/$SITE" || { echo "build.sh: unexpected venv layout (no $SITE)" >&2; exit 1; }
    install_wheels "$scratch/root" "$WHEELS"/*.whl
    tar -C "$scratch/root" -cf "$VENV_TAR.tmp" opt/siteward
    mv "$VENV_TAR.tmp" "$VENV_TAR"
    rm -rf "$scratch"
    gc_cache "venv-$FLAVOUR-*.tar" 1
fi
T_VENV=$(date +%s)
[ "${SITEWARD_STOP_AFTER:-}" = venv ] && exit 0

# ---------------------------------------------------------------------------------------
# 3. the image
OWN_KEY="$("$PYTHON" - "$OWN_WHEEL" <<'PY'
import hashlib, sys, zipfile
h = hashlib.sha256()
with zipfile.ZipFile(sys.argv[1]) as z:  # contents, not the zip's timestamps
    for name in sorted(z.namelist()):
        h.update(name.encode() + b"\0" + z.read(name))
print(h.hexdigest()[:16])
PY
)"
IMAGE_KEY="$(hash_of "-$VENV_KEY $OWN_KEY $VERSION $VARIANT $BOOT_MB $ROOT_MB $DATA_MB" "$ROOT/systemd" "$HERE/rootfs" \
    "$HERE/boot" "$HERE/build.sh" "$ROOT/docs/appliance.md")"
NAME="siteward-$VERSION-arm64"
[ "$VARIANT" = test ] && NAME="$NAME-test"
STAMP="$OUT/$NAME.key"
if [ "$FRESH" = 0 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$IMAGE_KEY" ]; then
    log "image: $OUT/$NAME is up to date (key $IMAGE_KEY)"
    exit 0
fi
log "image: assembling $NAME (key $IMAGE_KEY)"
# per build: two builds at once (a developer and CI on one machine) must not share a scratch tree
WORK="$CACHE/work-$VARIANT-$$"
rm -rf "$WORK" && mkdir -p "$WORK"
TREE="$WORK/root"
cp -a "$BASE" "$TREE"
tar -C "$TREE" -xf "$VENV_TAR"
install_wheels "$TREE" "$OWN_WHEEL"
# the console script pip would have written, with the image's interpreter
cat > "$TREE/opt/siteward/venv/bin/siteward" <<'PY'
#!/opt/siteward/venv/bin/python3
import sys

from gateway.cli import main

sys.exit(main())
PY
chmod 0755 "$TREE/opt/siteward/venv/bin/siteward"
ln -sf /opt/siteward/venv/bin/siteward "$TREE/usr/local/bin/siteward"

cp -a "$HERE/rootfs/." "$TREE/"
install -m 0644 "$ROOT"/systemd/*.service "$ROOT"/systemd/*.timer "$TREE/usr/lib/systemd/system/"
install -D -m 0644 "$ROOT/docs/appliance.md" "$TREE/usr/share/doc/siteward/appliance.md"
SW_GID="$(awk -F: '$1 == "siteward" {print $3}' "$TREE/etc/group")"
chown -R "0:$SW_GID" "$TREE/etc/siteward"
chmod 0750 "$TREE/etc/siteward" && chmod 0640 "$TREE/etc/siteward/siteward.toml"
systemctl --root="$TREE" enable siteward-gateway.service siteward-firstboot.service siteward-growdata.service
# no package lists fetched and rewritten on the card every day: the appliance is updated as an image
systemctl --root="$TREE" mask apt-daily.timer apt-daily-upgrade.timer
if [ "$VARIANT" = test ]; then
    # the boot test reads systemd's status lines on the serial console: no login prompt there
    systemctl --root="$TREE" mask serial-getty@ttyAMA0.service
fi

# the boot partition: the firmware, kernel and initrd raspi-firmware put in /boot/firmware,
# plus the installer's example; in the root file system /boot/firmware is only a mount point
BOOTDIR="$WORK/bootfs"
mv "$TREE/boot/firmware" "$BOOTDIR" && mkdir -m 0755 "$TREE/boot/firmware"
cp "$HERE/boot/"* "$BOOTDIR/"
mkdir -p "$OUT"
cp "$TREE"/boot/vmlinuz-* "$OUT/$NAME.vmlinuz"
cp "$TREE"/boot/initrd.img-* "$OUT/$NAME.initrd.img"

log "image: file systems (mkfs.vfat + mtools, mkfs.ext4 -d: no loop mounts)"
mkfs.vfat -C -F 32 -n SITEWARD "$WORK/boot.vfat" $((BOOT_MB * 1024)) >/dev/null
mcopy -s -p -i "$WORK/boot.vfat" "$BOOTDIR"/* ::/
mkfs.ext4 -q -F -L sw-root -d "$TREE" -E root_owner=0:0 "$WORK/root.ext4" "${ROOT_MB}M"
mkfs.ext4 -q -F -L sw-data -E root_owner=0:0 "$WORK/data.ext4" "${DATA_MB}M"

# MBR (the Pi 4/5 boot ROMs read it everywhere): 4 MiB alignment, then boot, root, data.
# The image ends exactly where the data partition ends (no unpadded tail for a flasher to trip on).
IMG="$WORK/$NAME.img"
start=8192
boot_s=$((BOOT_MB * 2048)); root_s=$((ROOT_MB * 2048)); data_s=$((DATA_MB * 2048))
truncate -s $(( (start + boot_s + root_s + data_s) * 512 )) "$IMG"
sfdisk -q "$IMG" <<TABLE
label: dos
unit: sectors
start=$start, size=$boot_s, type=c, bootable
start=$((start + boot_s)), size=$root_s, type=83
start=$((start + boot_s + root_s)), size=$data_s, type=83
TABLE
dd if="$WORK/boot.vfat" of="$IMG" bs=512 seek=$start conv=notrunc,sparse status=none
dd if="$WORK/root.ext4" of="$IMG" bs=512 seek=$((start + boot_s)) conv=notrunc,sparse status=none
dd if="$WORK/data.ext4" of="$IMG" bs=512 seek=$((start + boot_s + root_s)) conv=notrunc,sparse status=none
T_ASM=$(date +%s)

rm -f "$OUT/$NAME".img*
if [ "$VARIANT" = release ]; then
    # xz -6: ~22% smaller than zstd -10 (171 vs 219 MB measured) at ~14x the CPU, paid once per release
    log "image: xz -6 (takes a few minutes)"
    xz -6 -T0 -c "$IMG" > "$OUT/$NAME.img.xz"
    (cd "$OUT" && sha256sum "$NAME.img.xz" > "$NAME.img.xz.sha256")
    ARTIFACT="$OUT/$NAME.img.xz"
else
    # the test image is booted, not downloaded: raw, no compression to wait for
    mv "$IMG" "$OUT/$NAME.img"
    (cd "$OUT" && sha256sum "$NAME.img" > "$NAME.img.sha256")
    ARTIFACT="$OUT/$NAME.img"
fi
T_END=$(date +%s)
RAW_BYTES=$(( (start + boot_s + root_s + data_s) * 512 ))
cat > "$OUT/$NAME.build.json" <<JSON
{"name": "$NAME", "variant": "$VARIANT", "initramfs_modules": "$INITRAMFS_MODULES", "key": "$IMAGE_KEY",
 "artifact": "$(basename "$ARTIFACT")",
 "artifact_bytes": $(stat -c %s "$ARTIFACT"), "raw_bytes": $RAW_BYTES,
 "root_used_bytes": $(du -sb "$TREE" | cut -f1),
 "seconds": {"base": $((T_BASE - T0)), "venv": $((T_VENV - T_BASE)), "assemble": $((T_ASM - T_VENV)),
             "compress": $((T_END - T_ASM)), "total": $((T_END - T0))}}
JSON
echo "$IMAGE_KEY" > "$STAMP"
rm -rf "$WORK"
log "image: $ARTIFACT ($(du -h --apparent-size "$ARTIFACT" | cut -f1)) in $((T_END - T0)) s"

#!/bin/sh
# mmdebstrap setup hook: files that must exist before the packages are configured,
# because the kernel and firmware hooks read them while linux-image-arm64 installs.
set -eu
root="$1"
here="$(dirname "$0")/../base"
mkdir -p "$root/etc/initramfs-tools/conf.d" "$root/etc/default"
# MODULES=list: the initramfs carries only what image/base/initramfs-modules names.
# MODULES=most (Debian's default) takes ~10 more minutes under emulation; the release
# variant keeps it (SITEWARD_INITRAMFS_MODULES=most) for hardware we cannot test here.
echo "MODULES=${SITEWARD_INITRAMFS_MODULES:-list}" > "$root/etc/initramfs-tools/conf.d/siteward.conf"
cp "$here/initramfs-modules" "$root/etc/initramfs-tools/modules"
# raspi-firmware writes cmdline.txt from this: root by label, consoles on HDMI and the UART
cat > "$root/etc/default/raspi-firmware" <<CONF
ROOTPART=LABEL=sw-root
CONSOLES="tty1 ttyS1,115200"
KERNEL_ARCH=arm64
CONF

#!/usr/bin/env bash
# What the appliance's image build and boot test need (tests/appliance, image/build.sh):
# Debian packages, and qemu-aarch64 registered with binfmt_misc so an arm64 chroot runs here.
# Called by scripts/test.sh; harmless to run again.
source "$(dirname "$0")/_env.sh"
apt_install mmdebstrap arch-test debian-archive-keyring qemu-user-static binfmt-support qemu-system-arm \
    mtools dosfstools e2fsprogs fdisk xz-utils systemd
if [ "$(id -u)" -eq 0 ]; then
    mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || true
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
fi

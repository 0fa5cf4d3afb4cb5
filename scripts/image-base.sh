#!/usr/bin/env bash
# A base image for Containerfile built from Debian packages alone, for machines that reach a Debian mirror
# but no container registry:  scripts/image-base.sh [TAG]   then   podman build --build-arg BASE_IMAGE=TAG ...
# Needs root (or fakeroot mode), mmdebstrap and podman: apt-get install mmdebstrap podman
set -euo pipefail
tag=${1:-localhost/accessd-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
for tool in mmdebstrap podman; do
    command -v "$tool" >/dev/null || { echo "image-base: $tool not found (apt-get install $tool)" >&2; exit 1; }
done
# passwd: useradd for the non-root user; python3-venv: the build stage's venv and pip (ensurepip).
# No docs, man pages or locales: the slim image leaves them out too.
# shellcheck disable=SC2016  # "$1" is the hook's argument (the new root)
mmdebstrap --variant=minbase --quiet \
    --include=python3,python3-venv,ca-certificates,passwd \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm - "$mirror" \
    | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$tag"
podman image inspect --format '{{.Id}} {{.Size}}' "$tag"

# cachefs sidecar / DaemonSet / Fluid ThinRuntime image.
#
#   docker build -t REGISTRY/cachefs:0.1.0 .
#   docker run --rm --device /dev/fuse --cap-add SYS_ADMIN --security-opt apparmor=unconfined \
#       -v /mnt/imagenet:/mnt/imagenet:rshared -v /var/cache/cachefs:/var/cache/cachefs \
#       -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY \
#       REGISTRY/cachefs:0.1.0 s3://my-bucket/imagenet /mnt/imagenet --region us-west-2 --allow-other
#
# The container runs `cachefs mount --foreground SOURCE MOUNTPOINT [options]` and unmounts
# cleanly on SIGTERM (docker stop, pod deletion). It needs /dev/fuse and CAP_SYS_ADMIN (or
# --privileged); for the mount to be seen outside the container, the mount point must be a
# bind mount with shared propagation (`:rshared` above, `mountPropagation: Bidirectional` in
# Kubernetes, which requires a privileged container), on a host folder that is itself shared
# (systemd makes / shared; check with `findmnt -o TARGET,PROPAGATION /mnt/imagenet`).
# deploy/ has Kubernetes manifests; deploy/fluid/fluid-entrypoint.py is in the image for Fluid.

ARG PYTHON_IMAGE=python:3.11-slim

# -- build: pyfuse3 compiles against libfuse3; the compiler stays in this stage --
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 libfuse3-dev pkg-config gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# -- runtime: fuse3 brings libfuse3 and fusermount3 --
FROM ${PYTHON_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels cachefs \
    && rm -rf /wheels \
    && ln -s "$(command -v mount.cachefs)" /sbin/mount.cachefs
COPY --chmod=0755 deploy/fluid/fluid-entrypoint.py /usr/local/bin/cachefs-fluid-entrypoint
# The SSD tier defaults to /var/cache/cachefs (root): mount a node-local disk there.
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["cachefs", "mount", "--foreground"]

# syntax=docker/dockerfile:1
# Two images from one build, each one static (musl) binary:
# - byok-operator (the default target): `byok-operator controller`, on distroless "static"
#   (no shell, no libc, no package manager), UID 65532;
# - byok-proxy (`--target proxy`): the sidecar the webhook injects, on scratch with nothing but
#   its binary and the CA bundle it checks providers' certificates with. The webhook runs it
#   as UID 15532 (the image's default user too).
# `make static` is the build; `make test` builds it the same way, runs both binaries'
# `--version` and makes the test pods' images from them.
#
#   docker build -t byok-operator:dev .
#   docker build --target proxy -t byok-proxy:dev .
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN make static \
 && cp target/x86_64-unknown-linux-musl/release/byok-operator /byok-operator \
 && cp target/x86_64-unknown-linux-musl/sidecar/byok-proxy /byok-proxy

FROM scratch AS proxy
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /byok-proxy /byok-proxy
USER 15532:15532
ENTRYPOINT ["/byok-proxy"]

FROM gcr.io/distroless/static-debian12:nonroot AS operator
COPY --from=build /byok-operator /byok-operator
USER 65532:65532
ENTRYPOINT ["/byok-operator"]
CMD ["controller"]

# syntax=docker/dockerfile:1
# The one image of byok-operator: `byok-operator controller` is the operator, `byok-operator
# proxy` the sidecar the webhook injects (the chart passes this same image to both).
# One static (musl) binary on distroless "static": no shell, no libc, no package manager,
# UID 65532. `make static` is the build; `make test` builds it the same way, runs
# `--version` and makes the test pods' sidecar image from it.
#
#   docker build -t byok-operator:dev .
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN make static \
 && cp target/x86_64-unknown-linux-musl/release/byok-operator /byok-operator

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /byok-operator /byok-operator
USER 65532:65532
ENTRYPOINT ["/byok-operator"]
CMD ["controller"]

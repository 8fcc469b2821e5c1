# taskstack's image for machines with registry access:
#   docker build -t taskstack .
# One image holds the multi-call /taskstack and the links /taskstack-web,
# /taskstack-worker and /taskstack-beat to it; each service runs a different
# command of it (compose/docker-compose.yml).
#
# The project's CI and air-gapped machines cannot pull rust:1-bookworm, so
# this file is not built there: `stackctl build` makes the same image
# (same paths, user and default command, FROM scratch) from binaries
# compiled on the host. Keep the two in step (bins/stackctl/src/build.rs).
# Works with the classic builder and with BuildKit.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Static glibc binaries (crt-static needs an explicit --target, so that
# proc-macros stay dynamic); nothing else is needed in the final image.
# Fat LTO and one codegen unit, like stackctl's `image` profile: about 15 %
# smaller binaries than the workspace's release profile.
RUN target="$(uname -m)-unknown-linux-gnu" \
 && RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
    CARGO_PROFILE_RELEASE_OPT_LEVEL=s \
    cargo build --release --locked --target "$target" \
      -p taskstack-multicall \
 && mkdir -p /out/tmp /out/etc/ssl/certs \
 && chmod 1777 /out/tmp \
 && cp "target/$target/release/taskstack" /out/ \
 && ln -s taskstack /out/taskstack-web \
 && ln -s taskstack /out/taskstack-worker \
 && ln -s taskstack /out/taskstack-beat \
 && cp /etc/ssl/certs/ca-certificates.crt /out/etc/ssl/certs/

FROM scratch
LABEL org.opencontainers.image.title="taskstack" \
      org.opencontainers.image.description="taskstack-web, taskstack-worker and taskstack-beat"
COPY --from=build /out/ /
# nobody:nogroup, numeric: there is no /etc/passwd.
USER 65534:65534
CMD ["/taskstack-worker"]

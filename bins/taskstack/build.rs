//! Link options of the multi-call binary, from the environment of the
//! build (set by `stackctl build` and `scripts/symbol-order`, never needed
//! otherwise):
//!
//! - `TASKSTACK_SYMBOL_ORDER=<file>`: lay out the functions named in the
//!   file (one symbol per line) first and in that order
//!   (`--symbol-ordering-file`), so the code every service runs at start
//!   and while idle shares a few pages instead of touching pages all over
//!   the binary. Names the build does not have are ignored. A relative
//!   path is taken from this package's directory: `stackctl build` passes
//!   `symbol-order.txt`, made by `scripts/symbol-order`.
//! - `TASKSTACK_LINK_MAP=<file>`: write the linker's map (every function's
//!   address and size, even in a stripped binary), from which
//!   `scripts/symbol-order` turns executed addresses into names.
//!
//! Both are options of LLD, Rust's default linker on
//! x86_64-unknown-linux-gnu: they are passed only when asked for, and only
//! for that target.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=TASKSTACK_SYMBOL_ORDER");
    println!("cargo:rerun-if-env-changed=TASKSTACK_LINK_MAP");
    let order = env::var_os("TASKSTACK_SYMBOL_ORDER").filter(|v| !v.is_empty());
    let map = env::var_os("TASKSTACK_LINK_MAP").filter(|v| !v.is_empty());
    if order.is_none() && map.is_none() {
        return;
    }
    // LLD is the linker Rust uses by default on this target only.
    let target = env::var("TARGET").unwrap_or_default();
    if target != "x86_64-unknown-linux-gnu" {
        println!(
            "cargo:warning=TASKSTACK_SYMBOL_ORDER and TASKSTACK_LINK_MAP are LLD options, \
             passed on x86_64-unknown-linux-gnu only; ignored for {target}"
        );
        return;
    }
    if let Some(order) = order {
        let dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
        let order = dir.join(order);
        assert!(
            order.is_file(),
            "TASKSTACK_SYMBOL_ORDER names {}, which is not a file (scripts/symbol-order makes it)",
            order.display()
        );
        let order = order.to_string_lossy();
        println!("cargo:rerun-if-changed={order}");
        println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={order}");
        // Names missing from this build (the file lags behind the code)
        // are expected; each would otherwise be a warning.
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
    if let Some(map) = map {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,-Map={}",
            map.to_string_lossy()
        );
    }
}

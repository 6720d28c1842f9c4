// For the Python extension: let the installed module find the pip-installed libtorch, and record
// which torch it was built against so `import anomalox_tch` can check it. For `cargo test` (no
// Python feature): let the test binaries find that same libtorch (an rpath to torch/lib).
use std::process::Command;

fn python(code: &str) -> Option<String> {
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python".to_string());
    Command::new(python)
        .args(["-c", code])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    if std::env::var_os("CARGO_FEATURE_PYTHON").is_none() {
        // Without the extension the only linked binaries are the tests: an absolute rpath to the
        // venv's torch/lib (never part of a wheel).
        if let Some(lib) =
            python("import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
        {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        }
        println!("cargo:rustc-env=ANOMALOX_TORCH_VERSION=none");
        return;
    }
    println!("cargo:rustc-link-arg-cdylib=-Wl,-rpath,$ORIGIN/../torch/lib");
    let version = python("import torch; print(torch.__version__.split('+')[0])")
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=ANOMALOX_TORCH_VERSION={version}");
}

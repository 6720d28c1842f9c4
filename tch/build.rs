// For the Python extension: let the installed module find the pip-installed libtorch, and record
// which torch it was built against so `import anomalox` can check it.
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    if std::env::var_os("CARGO_FEATURE_PYTHON").is_none() {
        println!("cargo:rustc-env=ANOMALOX_TORCH_VERSION=none");
        return;
    }
    println!("cargo:rustc-link-arg-cdylib=-Wl,-rpath,$ORIGIN/../torch/lib");
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python".to_string());
    let version = Command::new(python)
        .args(["-c", "import torch; print(torch.__version__.split('+')[0])"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=ANOMALOX_TORCH_VERSION={version}");
}

//! How every heavy call runs: off the GIL, on a rayon pool of the requested size, interruptible by
//! Ctrl-C, with Rust panics turned into `anomalox.exceptions.InternalError` instead of an abort.
//! Errors are raised as the classes of `anomalox.exceptions`, so there is one hierarchy to catch.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError, PyValueError};
use pyo3::import_exception;
use pyo3::prelude::*;

use crate::error::{KernelError, KernelResult};
use crate::interrupt::Interrupt;

import_exception!(anomalox.exceptions, InternalError);
import_exception!(anomalox.exceptions, KernelArgumentError);

/// A `KernelArgumentError` ("`arg: msg`", a `ValueError`) whose `.arg` names the argument.
pub fn argument_error(arg: &str, msg: impl std::fmt::Display) -> PyErr {
    KernelArgumentError::new_err((format!("{arg}: {msg}"), arg.to_string()))
}

/// How often the calling thread wakes up to look for Ctrl-C while a kernel runs.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

fn pool(n_threads: usize) -> PyResult<Arc<rayon::ThreadPool>> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let pools = POOLS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut pools = pools
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(p) = pools.get(&n_threads) {
        return Ok(p.clone());
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(n_threads)
        .thread_name(|i| format!("anomalox-{i}"))
        .build()
        .map_err(|e| {
            PyRuntimeError::new_err(format!("could not start {n_threads} threads: {e}"))
        })?;
    let p = Arc::new(p);
    pools.insert(n_threads, p.clone());
    Ok(p)
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

pub fn to_py_err(err: KernelError) -> PyErr {
    match err {
        KernelError::InvalidArgument { arg, msg } => argument_error(arg, msg),
        KernelError::Numerical(_) => PyValueError::new_err(err.to_string()),
        KernelError::Interrupted => PyKeyboardInterrupt::new_err("interrupted"),
    }
}

/// Run `work` on a pool of `n_threads` with the GIL released.
///
/// The calling thread waits on a channel and, every `SIGNAL_POLL`, briefly takes the GIL to run
/// Python's signal handlers; a `KeyboardInterrupt` sets the flag the kernel polls, the kernel
/// returns early, and the interrupt is raised in Python.
pub fn run<T, F>(py: Python<'_>, n_threads: usize, work: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce(&Interrupt) -> KernelResult<T> + Send,
{
    if n_threads == 0 {
        return Err(argument_error(
            "n_threads",
            "expected a positive integer, got 0",
        ));
    }
    let pool = pool(n_threads)?;
    let flag = AtomicBool::new(false);
    let (outcome, signal) = py.allow_threads(|| {
        std::thread::scope(|scope| {
            let (done_tx, done_rx) = mpsc::channel::<()>();
            let flag = &flag;
            let pool = &pool;
            let worker = scope.spawn(move || {
                let result = catch_unwind(AssertUnwindSafe(|| {
                    pool.install(|| work(&Interrupt::new(flag)))
                }));
                let _ = done_tx.send(());
                result
            });
            let mut signal: Option<PyErr> = None;
            loop {
                match done_rx.recv_timeout(SIGNAL_POLL) {
                    Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if signal.is_none() {
                            if let Err(e) = Python::with_gil(|py| py.check_signals()) {
                                flag.store(true, Ordering::Relaxed);
                                signal = Some(e);
                            }
                        }
                    }
                }
            }
            // The worker caught its own panics, so join cannot fail; map it anyway.
            let outcome = worker.join().unwrap_or_else(Err);
            (outcome, signal)
        })
    });
    match outcome {
        Err(payload) => Err(InternalError::new_err(format!(
            "internal error (Rust panic): {}",
            panic_message(payload)
        ))),
        Ok(Err(KernelError::Interrupted)) => {
            Err(signal.unwrap_or_else(|| PyKeyboardInterrupt::new_err("interrupted")))
        }
        Ok(Err(e)) => Err(to_py_err(e)),
        Ok(Ok(value)) => match signal {
            // The kernel finished before it saw the flag: still honour the Ctrl-C.
            Some(e) => Err(e),
            None => Ok(value),
        },
    }
}

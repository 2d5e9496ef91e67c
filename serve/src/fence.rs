//! What a panic does, decided in one place.
//!
//! - Inside a **fence** (a request being answered, a client connection being served: see `server.rs`), a
//!   panic unwinds to the fence, which answers 500 or closes that one connection and counts it. Nothing a
//!   client sends can stop the process.
//! - Anywhere else (the report writer, the ledger's snapshot thread, the Kubernetes watch, the prober, the
//!   CLI commands), a panic ends the process at once, loudly, with SIGABRT: a sidecar that kept serving
//!   after its report writer died would answer without saving.
//!
//! Unwinding needs `panic = "unwind"`. The workspace's `release` profile aborts on panic (the filter needs
//! it, and Cargo has no per-package `panic`), so `kvab` ships from the profile `sidecar` (release with
//! unwinding: `cargo build --profile sidecar -p kvab`). A binary built with `panic = "abort"` still
//! works, but a fenced panic ends it too; it says so at start ([`unwinds`]).

use std::cell::Cell;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

thread_local! {
    /// How many fences the current thread is inside.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// True when this binary can catch a panic at a fence (`panic = "unwind"`).
pub const fn unwinds() -> bool {
    cfg!(panic = "unwind")
}

/// Installs the process's panic hook: the default message, and then, outside a fence, an abort.
pub fn install_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        if DEPTH.with(Cell::get) == 0 {
            // Straight to stderr, after the default message: RUST_LOG cannot filter it out.
            eprintln!("kvab: a panic outside request handling; aborting");
            std::process::abort();
        }
    }));
}

/// Marks the thread as inside a fence while it lives; dropped after the hook ran, also when unwinding.
struct Inside;

impl Inside {
    fn enter() -> Self {
        DEPTH.with(|depth| depth.set(depth.get().saturating_add(1)));
        Inside
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        DEPTH.with(|depth| depth.set(depth.get().saturating_sub(1)));
    }
}

/// The future ended in a panic (caught at its fence; the hook has printed the message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Panicked;

/// A future whose panics stop at this fence: it resolves to `Err(Panicked)` instead, and is never polled
/// again after one.
pub struct Fenced<F> {
    inner: Option<Pin<Box<F>>>,
}

pub fn fenced<F: Future>(future: F) -> Fenced<F> {
    Fenced {
        inner: Some(Box::pin(future)),
    }
}

impl<F: Future> Future for Fenced<F> {
    type Output = Result<F::Output, Panicked>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Err(Panicked));
        };
        let polled = {
            let _inside = Inside::enter();
            catch_unwind(AssertUnwindSafe(|| inner.as_mut().poll(cx)))
        };
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => {
                self.inner = None;
                Poll::Ready(Ok(output))
            }
            Err(_) => {
                // Dropping what panicked may panic again; that drop is fenced as well.
                let inner = self.inner.take();
                let _inside = Inside::enter();
                let _ = catch_unwind(AssertUnwindSafe(move || drop(inner)));
                Poll::Ready(Err(Panicked))
            }
        }
    }
}

/// Runs `f` inside a fence (for synchronous work such as building a connection's service).
pub fn call<T>(f: impl FnOnce() -> T) -> Result<T, Panicked> {
    let _inside = Inside::enter();
    catch_unwind(AssertUnwindSafe(f)).map_err(|_| Panicked)
}

#[cfg(test)]
#[allow(clippy::panic, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_inside_a_fence_resolves_to_panicked_and_the_depth_is_restored() {
        let result = fenced(async {
            if DEPTH.with(Cell::get) > 0 {
                panic!("inside");
            }
            1
        })
        .await;
        assert_eq!(result, Err(Panicked));
        assert_eq!(DEPTH.with(Cell::get), 0);
        assert_eq!(fenced(async { 2 }).await, Ok(2));
        assert_eq!(call(|| 3), Ok(3));
        assert_eq!(call(|| -> u8 { panic!("sync") }), Err(Panicked));
        assert_eq!(DEPTH.with(Cell::get), 0);
    }

    #[test]
    fn the_test_profile_unwinds() {
        assert!(unwinds());
    }

    /// What the child process does: the hook installed, then a panic where `KVAB_FENCE_CHILD` says.
    #[test]
    fn child() {
        let Ok(place) = std::env::var("KVAB_FENCE_CHILD") else {
            return;
        };
        install_hook();
        match place.as_str() {
            "thread" => {
                let _ = std::thread::spawn(|| panic!("a background bug")).join();
            }
            "task" => {
                let runtime = tokio::runtime::Runtime::new().unwrap();
                let _ = runtime.block_on(tokio::spawn(async { panic!("a background task bug") }));
            }
            _ => {
                let runtime = tokio::runtime::Runtime::new().unwrap();
                let fenced = runtime.block_on(fenced(async { panic!("a request bug") }));
                assert_eq!(fenced, Err(Panicked));
            }
        }
        println!("child survived");
    }

    fn run_child(place: &str) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "fence::tests::child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("KVAB_FENCE_CHILD", place)
            .output()
            .unwrap()
    }

    #[test]
    fn a_panic_outside_a_fence_aborts_the_process_and_one_inside_does_not() {
        use std::os::unix::process::ExitStatusExt;
        for place in ["thread", "task"] {
            let output = run_child(place);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(
                output.status.signal(),
                Some(6),
                "{place}: SIGABRT; {stderr}"
            );
            assert!(stderr.contains("aborting"), "{place}: {stderr}");
            assert!(!String::from_utf8_lossy(&output.stdout).contains("child survived"));
        }
        let output = run_child("fenced");
        assert!(output.status.success(), "{output:?}");
        assert!(String::from_utf8_lossy(&output.stdout).contains("child survived"));
    }
}

//! MLX's own message for a failed mlx-c call made outside mlx-rs. mlx-rs
//! keeps the messages of its handler to itself, so code that calls mlx-c
//! directly (quantization modes, distributed communication) would only see
//! a status. [`capture`] runs a call with a handler that records the message
//! on the calling thread and passes it on to mlx-rs's handler, so mlx-rs's
//! own errors keep their messages.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::sync::Once;

extern "C" {
    /// mlx-rs's handler (exported unmangled by mlx-rs 0.33): it stores the
    /// message for mlx-rs's next error report.
    fn default_mlx_error_handler(msg: *const c_char, data: *mut c_void);
}

thread_local! {
    static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
}

static INSTALL: Once = Once::new();

extern "C" fn recording_handler(msg: *const c_char, data: *mut c_void) {
    if !msg.is_null() {
        // SAFETY: MLX passes a NUL-terminated message alive for the call.
        let text = unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned();
        LAST.with(|last| *last.borrow_mut() = Some(text));
    }
    // SAFETY: the same arguments MLX gave us.
    unsafe { default_mlx_error_handler(msg, data) };
}

/// Puts the recording handler in place, after mlx-rs has installed its own
/// (mlx-rs installs it once, at its first operation; a later install of
/// its would replace ours).
fn install() {
    INSTALL.call_once(|| {
        // Any mlx-rs operation makes mlx-rs register its handler first.
        let _ = mlx_rs::ops::add(mlx_rs::Array::from_int(0), mlx_rs::Array::from_int(0));
        // SAFETY: a plain registration of a handler that lives forever.
        unsafe {
            mlx_sys::mlx_set_error_handler(Some(recording_handler), std::ptr::null_mut(), None);
        }
    });
}

/// Runs an mlx-c `call` returning a status; on a non-zero status, the
/// message MLX reported (or a generic one naming the status).
pub fn capture(call: impl FnOnce() -> i32) -> Result<(), String> {
    install();
    LAST.with(|last| last.borrow_mut().take());
    let status = call();
    if status == 0 {
        return Ok(());
    }
    Err(LAST
        .with(|last| last.borrow_mut().take())
        .unwrap_or_else(|| format!("MLX failed with status {status} and no message")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failing mlx-c call reports MLX's own words, and mlx-rs's own
    /// errors still carry theirs afterwards.
    #[test]
    fn a_failed_call_reports_mlx_s_message() {
        let a = mlx_rs::Array::from_slice(&[1f32, 2.0], &[2]);
        let b = mlx_rs::Array::from_slice(&[1f32, 2.0, 3.0], &[3]);
        let error = capture(|| unsafe {
            let mut res = mlx_sys::mlx_array_new();
            let stream = mlx_rs::Stream::cpu();
            let status = mlx_sys::mlx_add(&mut res, a.as_ptr(), b.as_ptr(), stream.as_ptr());
            mlx_sys::mlx_array_free(res);
            status
        })
        .unwrap_err();
        assert!(error.contains("broadcast"), "{error}");
        let mlx_rs_error = mlx_rs::ops::add(&a, &b).unwrap_err();
        assert!(mlx_rs_error.what().contains("broadcast"), "{mlx_rs_error}");
    }
}

//! The loss and gradients of a batch as a graph compiled once by MLX's
//! `compile` and replayed every step after: the forward pass, the autodiff
//! and the loss are traced on the first batch of each shape, MLX fuses their
//! element-wise work, and later steps skip building the graph on the host.
//! The trainable parameters and the batch are the compiled function's
//! inputs; frozen weights are read as constants of the trace (they do not
//! change while training; a trainer handed another model traces anew).
//! AdamW's update is a second compiled function (`Optimizer::compiled_step`).
//! What stays outside: the host's non-finite check, and adapter dropout
//! (whose random masks would be frozen into the trace; the trainer does not
//! compile a model that uses it).
//!
//! mlx-rs's `compile_with_state` needs a `'static` closure, and a model
//! borrowed for one step is not; this module calls mlx-c's compile directly
//! with a function id of its own, so the cached trace outlives the borrow
//! while the closure that traces it lives only during the call.

use crate::batch::Batch;
use crate::error::{Result, TrainError};
use crate::trainer::loss_and_grad_graph;
use mlx_rs::error::Exception;
use mlx_rs::module::{FlattenedModuleParam, ModuleParameters};
use mlx_rs::Array;
use mlx_zoo_core::CausalLm;
use std::ffi::c_void;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The function MLX traces: tracers in, the graph's outputs out.
pub type TracedBody<'a> = dyn FnMut(&[Array]) -> std::result::Result<Vec<Array>, Exception> + 'a;

/// Function ids for MLX's compile cache, far from mlx-rs's (which count up
/// from 1).
static NEXT_ID: AtomicUsize = AtomicUsize::new(usize::MAX / 2);

/// A function compiled by MLX under an id of its own: its traces (one per
/// set of input shapes) live in MLX's compile cache until it is dropped.
pub struct CompiledFunction {
    id: usize,
}

impl Default for CompiledFunction {
    fn default() -> Self {
        Self::new()
    }
}

impl CompiledFunction {
    /// A function with nothing traced yet.
    pub fn new() -> Self {
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Runs the compiled graph on `inputs` (lazily), tracing `body` first
    /// when no trace of these shapes is cached. `body` must build the same
    /// graph for the same shapes every time: it is only called to trace.
    pub fn call(&self, body: &mut TracedBody<'_>, inputs: &[Array]) -> Result<Vec<Array>> {
        apply_compiled(self.id, body, inputs)
    }
}

impl Drop for CompiledFunction {
    fn drop(&mut self) {
        // SAFETY: plain calls into mlx-c with a handle it made; a failure
        // only leaves a cache entry behind.
        unsafe {
            let mut cache = mlx_sys::mlx_compile_cache_new();
            if mlx_sys::mlx_detail_compile_cache(&mut cache) == 0 {
                mlx_sys::mlx_detail_compile_erase(cache, self.id);
            }
            mlx_sys::mlx_compile_cache_free(cache);
        }
    }
}

/// One compiled loss-and-gradient function.
#[derive(Default)]
pub struct CompiledLossGrad {
    function: CompiledFunction,
}

impl CompiledLossGrad {
    /// A function with nothing traced yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The mean loss of `batch` and the gradients of the model's trainable
    /// parameters, lazily (evaluate them to run the compiled graph).
    pub fn loss_and_grad(
        &self,
        model: &mut dyn CausalLm,
        batch: &Batch,
    ) -> Result<(Array, FlattenedModuleParam)> {
        let mut names: Vec<Rc<str>> = model.trainable_parameters().flatten().into_keys().collect();
        names.sort();
        let params = model.trainable_parameters().flatten();
        let mut inputs: Vec<Array> = names.iter().map(|n| (*params[n]).clone()).collect();
        drop(params);
        inputs.extend([
            batch.inputs.clone(),
            batch.targets.clone(),
            batch.mask.clone(),
        ]);
        if let Some(segments) = &batch.segments {
            inputs.push(segments.clone());
        }
        let count = names.len();
        let mut trace = |tracers: &[Array]| -> std::result::Result<Vec<Array>, Exception> {
            let (params, data) = tracers.split_at(count);
            traced_loss_and_grad(model, &names, params, data)
        };
        let outputs = self.function.call(&mut trace, &inputs)?;
        if outputs.len() != count + 1 {
            return Err(TrainError::InvalidSetting(format!(
                "the compiled step returned {} arrays, expected {}",
                outputs.len(),
                count + 1
            )));
        }
        let mut outputs = outputs.into_iter();
        let loss = outputs.next().expect("length checked above");
        Ok((loss, names.into_iter().zip(outputs).collect()))
    }
}

/// The traced body: the tracers stand in for the trainable parameters while
/// the loss and its gradients are built, then the model gets its own arrays
/// back. Returns the loss and the gradients in `names` order.
fn traced_loss_and_grad(
    model: &mut dyn CausalLm,
    names: &[Rc<str>],
    params: &[Array],
    data: &[Array],
) -> std::result::Result<Vec<Array>, Exception> {
    let originals: FlattenedModuleParam = {
        let current = model.trainable_parameters().flatten();
        names
            .iter()
            .map(|n| (n.clone(), (*current[n]).clone()))
            .collect()
    };
    model.update_flattened(names.iter().cloned().zip(params.iter().cloned()).collect());
    let result = build_loss_and_grad(model, names, data);
    model.update_flattened(originals);
    result
}

fn build_loss_and_grad(
    model: &mut dyn CausalLm,
    names: &[Rc<str>],
    data: &[Array],
) -> std::result::Result<Vec<Array>, Exception> {
    let (loss, grads) = loss_and_grad_graph(model, &data[0], &data[1], &data[2], data.get(3))?;
    let mut outputs = vec![loss];
    for name in names {
        let grad = grads
            .get(name)
            .ok_or_else(|| Exception::custom(format!("no gradient for {name}")))?;
        outputs.push(grad.clone());
    }
    Ok(outputs)
}

/// What the trampoline needs: the Rust body and the first error it raised.
struct Payload<'a> {
    body: &'a mut TracedBody<'a>,
    error: Option<String>,
}

/// Calls mlx-c's compile of `body` under `id` on `inputs`: MLX traces `body`
/// when no trace of these input shapes is cached, then runs the compiled
/// graph (lazily: the outputs are not evaluated).
fn apply_compiled(id: usize, body: &mut TracedBody<'_>, inputs: &[Array]) -> Result<Vec<Array>> {
    let mut payload = Payload { body, error: None };
    let failed = |what: &str, payload: &Payload| {
        TrainError::InvalidSetting(match &payload.error {
            Some(error) => format!("compiling the training step: {error}"),
            None => format!(
                "compiling the training step: MLX could not {what} (run with --compile off to train uncompiled)"
            ),
        })
    };
    // SAFETY: the closure handle points at `payload`, which outlives it: the
    // handles are freed before this function returns, and MLX's compile
    // cache keeps the traced graph, not the function. Array handles are
    // borrowed from `inputs` for the vector, which copies them.
    unsafe {
        let closure = mlx_sys::mlx_closure_new_func_payload(
            Some(trampoline),
            (&mut payload as *mut Payload).cast::<c_void>(),
            Some(keep_payload),
        );
        let mut compiled = mlx_sys::mlx_closure_new();
        let status =
            mlx_sys::mlx_detail_compile(&mut compiled, closure, id, false, std::ptr::null(), 0);
        if status != 0 {
            mlx_sys::mlx_closure_free(compiled);
            mlx_sys::mlx_closure_free(closure);
            return Err(failed("compile it", &payload));
        }
        let handles: Vec<mlx_sys::mlx_array> = inputs.iter().map(Array::as_ptr).collect();
        let input_vector = mlx_sys::mlx_vector_array_new_data(handles.as_ptr(), handles.len());
        let mut output_vector = mlx_sys::mlx_vector_array_new();
        let status = mlx_sys::mlx_closure_apply(&mut output_vector, compiled, input_vector);
        mlx_sys::mlx_vector_array_free(input_vector);
        mlx_sys::mlx_closure_free(compiled);
        mlx_sys::mlx_closure_free(closure);
        if status != 0 {
            mlx_sys::mlx_vector_array_free(output_vector);
            return Err(failed("run it", &payload));
        }
        let outputs = vector_values(output_vector);
        mlx_sys::mlx_vector_array_free(output_vector);
        Ok(outputs)
    }
}

/// The arrays of an mlx-c vector, each with a reference of its own.
///
/// # Safety
/// `vector` must be a live mlx-c vector of arrays.
unsafe fn vector_values(vector: mlx_sys::mlx_vector_array) -> Vec<Array> {
    let size = mlx_sys::mlx_vector_array_size(vector);
    (0..size)
        .map(|index| {
            let mut array = mlx_sys::mlx_array_new();
            mlx_sys::mlx_vector_array_get(&mut array, vector, index);
            Array::from_ptr(array)
        })
        .collect()
}

/// mlx-c's payload destructor: the payload lives on the caller's stack.
unsafe extern "C" fn keep_payload(_payload: *mut c_void) {}

/// mlx-c's callback: runs the payload's body on the tracers. A failure is
/// kept in the payload (MLX only sees a non-zero status).
unsafe extern "C" fn trampoline(
    result: *mut mlx_sys::mlx_vector_array,
    input: mlx_sys::mlx_vector_array,
    payload: *mut c_void,
) -> std::os::raw::c_int {
    let payload = &mut *payload.cast::<Payload>();
    let tracers = vector_values(input);
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (payload.body)(&tracers)));
    match outcome {
        Ok(Ok(outputs)) => {
            let handles: Vec<mlx_sys::mlx_array> = outputs.iter().map(Array::as_ptr).collect();
            let vector = mlx_sys::mlx_vector_array_new_data(handles.as_ptr(), handles.len());
            mlx_sys::mlx_vector_array_set(result, vector);
            mlx_sys::mlx_vector_array_free(vector);
            0
        }
        Ok(Err(error)) => {
            payload
                .error
                .get_or_insert_with(|| error.what().to_string());
            1
        }
        Err(_) => {
            payload
                .error
                .get_or_insert_with(|| "the traced step panicked".to_string());
            1
        }
    }
}

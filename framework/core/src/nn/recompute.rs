//! Gradient checkpointing: a block run through [`checkpointed`] keeps only
//! its inputs for the backward pass and recomputes its activations there,
//! trading one more forward pass per block for the memory its activations
//! would hold. It is MLX's `checkpoint` transform (which mlx-rs does not
//! wrap), applied to a copy of the block whose trainable parameters are
//! explicit inputs, so gradients reach them through the recomputation.

use crate::error::{Error, Result};
use mlx_rs::module::ModuleParameters;
use mlx_rs::Array;
use std::cell::RefCell;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;

thread_local! {
    /// Why the last checkpointed body failed (MLX only sees a status).
    static BODY_FAILURE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `forward(block, inputs)` under gradient checkpointing and returns
/// its outputs.
///
/// Gradients flow to `inputs` and to the block's trainable parameters (as
/// they are when called, tracers under `value_and_grad` included); frozen
/// parameters and whatever `forward` captures are constants. The backward
/// pass calls `forward` again on a copy of the block, so `forward` must be
/// a pure function of its arguments; set `random` when it draws random
/// numbers (dropout) and both passes draw the same ones from a seed taken
/// here.
pub fn checkpointed<B, F>(
    block: &B,
    inputs: &[Array],
    random: bool,
    forward: F,
) -> Result<Vec<Array>>
where
    B: ModuleParameters + Clone + 'static,
    F: Fn(&mut B, &[Array]) -> Result<Vec<Array>> + 'static,
{
    let parameters = block.trainable_parameters().flatten();
    let mut names: Vec<Rc<str>> = parameters.keys().cloned().collect();
    names.sort();
    let mut arguments = inputs.to_vec();
    arguments.extend(names.iter().map(|name| parameters[name].clone()));
    let seed = if random { Some(draw_seed()?) } else { None };
    let activations = inputs.len();
    let mut copy = block.clone();
    let body = move |arguments: &[Array]| -> Result<Vec<Array>> {
        let (inputs, values) = arguments.split_at(activations);
        copy.update_flattened(names.iter().cloned().zip(values.iter().cloned()).collect());
        if let Some(seed) = seed {
            mlx_rs::random::seed(seed)?;
        }
        forward(&mut copy, inputs)
    };
    apply(body, &arguments)
}

/// A seed from the thread's MLX key, so a run seeded once stays
/// reproducible.
fn draw_seed() -> Result<u64> {
    let seed = mlx_rs::random::randint::<_, i32>(0, i32::MAX, &[] as &[i32], None)?;
    Ok(seed.item_exact::<i32>() as u64)
}

/// Wraps `body` in MLX's `checkpoint` and applies it to `arguments`.
fn apply<F>(body: F, arguments: &[Array]) -> Result<Vec<Array>>
where
    F: FnMut(&[Array]) -> Result<Vec<Array>> + 'static,
{
    BODY_FAILURE.with_borrow_mut(|failure| *failure = None);
    let failed = |what: &str| {
        let reason = BODY_FAILURE
            .with_borrow_mut(Option::take)
            .unwrap_or_else(|| format!("MLX could not {what}"));
        Error::InvalidArgument(format!("gradient checkpointing: {reason}"))
    };
    // SAFETY: the payload is a leaked `Box<F>` that MLX owns from here on and
    // frees through `drop_payload::<F>`; every handle created here is freed
    // once, after its last use; arrays read back get their own references.
    unsafe {
        let payload = Box::into_raw(Box::new(body)) as *mut c_void;
        let inner = mlx_sys::mlx_closure_new_func_payload(
            Some(trampoline::<F>),
            payload,
            Some(drop_payload::<F>),
        );
        let mut wrapped = mlx_sys::mlx_closure_new();
        let status = mlx_sys::mlx_checkpoint(&mut wrapped, inner);
        mlx_sys::mlx_closure_free(inner);
        if status != 0 {
            mlx_sys::mlx_closure_free(wrapped);
            return Err(failed("build the checkpoint"));
        }
        let handles: Vec<mlx_sys::mlx_array> = arguments.iter().map(Array::as_ptr).collect();
        let input = mlx_sys::mlx_vector_array_new_data(handles.as_ptr(), handles.len());
        let mut output = mlx_sys::mlx_vector_array_new();
        let status = mlx_sys::mlx_closure_apply(&mut output, wrapped, input);
        mlx_sys::mlx_vector_array_free(input);
        mlx_sys::mlx_closure_free(wrapped);
        if status != 0 {
            mlx_sys::mlx_vector_array_free(output);
            return Err(failed("run the block"));
        }
        let outputs = read_vector(output);
        mlx_sys::mlx_vector_array_free(output);
        outputs.ok_or_else(|| failed("read the block's outputs"))
    }
}

/// The arrays of an MLX vector, each with its own reference.
///
/// # Safety
/// `vector` must be a live vector handle.
unsafe fn read_vector(vector: mlx_sys::mlx_vector_array) -> Option<Vec<Array>> {
    let size = mlx_sys::mlx_vector_array_size(vector);
    (0..size)
        .map(|index| {
            let mut handle = mlx_sys::mlx_array_new();
            if mlx_sys::mlx_vector_array_get(&mut handle, vector, index) == 0 {
                Some(Array::from_ptr(handle))
            } else {
                mlx_sys::mlx_array_free(handle);
                None
            }
        })
        .collect()
}

/// Calls the boxed body from MLX; a failure or panic is recorded for
/// [`apply`] and reported to MLX as a non-zero status.
extern "C" fn trampoline<F>(
    result: *mut mlx_sys::mlx_vector_array,
    input: mlx_sys::mlx_vector_array,
    payload: *mut c_void,
) -> i32
where
    F: FnMut(&[Array]) -> Result<Vec<Array>>,
{
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: MLX passes back the payload `apply` boxed as an `F`, and
        // live vector handles.
        let body = unsafe { &mut *(payload as *mut F) };
        let arguments = unsafe { read_vector(input) }
            .ok_or_else(|| "MLX passed an unreadable input".to_string())?;
        let outputs = body(&arguments).map_err(|e| e.to_string())?;
        let handles: Vec<mlx_sys::mlx_array> = outputs.iter().map(Array::as_ptr).collect();
        // SAFETY: `result` is the vector MLX allocated for the outputs; the
        // call copies the handles (adding references).
        let status =
            unsafe { mlx_sys::mlx_vector_array_set_data(result, handles.as_ptr(), handles.len()) };
        if status == 0 {
            Ok(())
        } else {
            Err("MLX could not store the block's outputs".to_string())
        }
    }));
    let failure = match outcome {
        Ok(Ok(())) => return 0,
        Ok(Err(reason)) => reason,
        Err(panic) => format!(
            "the block panicked: {}",
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default()
        ),
    };
    BODY_FAILURE.with_borrow_mut(|slot| *slot = Some(failure));
    1
}

/// Frees the boxed body when MLX drops its last copy of the closure.
extern "C" fn drop_payload<F>(payload: *mut c_void) {
    if !payload.is_null() {
        // SAFETY: the payload is the `Box<F>` leaked in `apply`, freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| unsafe {
            drop(Box::from_raw(payload as *mut F));
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::module::Param;

    /// `y = tanh(x @ w) * 2`, a block with one trainable weight.
    #[derive(Debug, Clone, mlx_rs::macros::ModuleParameters)]
    struct Toy {
        #[param]
        w: Param<Array>,
    }

    fn toy_forward(block: &mut Toy, inputs: &[Array]) -> Result<Vec<Array>> {
        let y = mlx_rs::ops::tanh(&inputs[0].matmul(&*block.w)?)?;
        Ok(vec![y.multiply(Array::from_f32(2.0))?])
    }

    fn gradients(checkpoint: bool) -> (Array, Array, Array) {
        let key = mlx_rs::random::key(3).unwrap();
        let x = mlx_rs::random::normal::<f32>(&[4, 8], None, None, &key).unwrap();
        let w = mlx_rs::random::normal::<f32>(&[8, 8], None, None, &key).unwrap();
        let loss =
            move |args: &[Array]| -> std::result::Result<Vec<Array>, mlx_rs::error::Exception> {
                let mut block = Toy {
                    w: Param::new(args[1].clone()),
                };
                let mut h = args[0].clone();
                for _ in 0..3 {
                    h = if checkpoint {
                        checkpointed(&block, &[h], false, toy_forward)
                    } else {
                        toy_forward(&mut block, &[h])
                    }
                    .map_err(|e| mlx_rs::error::Exception::custom(e.to_string()))?
                    .remove(0);
                }
                Ok(vec![h.sum(None)?])
            };
        let mut value_and_grad = mlx_rs::transforms::value_and_grad_with_argnums(loss, &[0, 1]);
        let (values, grads) = value_and_grad(&[x, w]).unwrap();
        (values[0].clone(), grads[0].clone(), grads[1].clone())
    }

    #[test]
    fn checkpointed_gradients_equal_plain_ones() {
        let (plain_value, plain_dx, plain_dw) = gradients(false);
        let (value, dx, dw) = gradients(true);
        assert!(value.all_close(&plain_value, 0.0, 0.0, None).unwrap());
        assert!(dx.all_close(&plain_dx, 1e-6, 1e-6, None).unwrap());
        assert!(dw.all_close(&plain_dw, 1e-6, 1e-6, None).unwrap());
        assert!(
            plain_dw
                .abs()
                .unwrap()
                .sum(None)
                .unwrap()
                .item_exact::<f32>()
                > 0.1
        );
    }

    /// With `random`, the recomputation draws the forward pass's numbers:
    /// the gradient of `sum(x * mask)` is the mask the forward pass used.
    #[test]
    fn recomputation_repeats_the_random_draws() {
        fn dropout(_: &mut Toy, inputs: &[Array]) -> Result<Vec<Array>> {
            let keep = Array::from_f32(0.5);
            let mask = mlx_rs::random::bernoulli(&keep, inputs[0].shape(), None)?
                .as_dtype(mlx_rs::Dtype::Float32)?;
            Ok(vec![inputs[0].multiply(&mask)?, mask])
        }
        let block = Toy {
            w: Param::new(Array::from_f32(0.0)),
        };
        let x = Array::ones::<f32>(&[64]).unwrap();
        let masks = RefCell::new(None);
        let loss = |args: &[Array]| -> std::result::Result<Vec<Array>, mlx_rs::error::Exception> {
            let outputs = checkpointed(&block, &[args[0].clone()], true, dropout)
                .map_err(|e| mlx_rs::error::Exception::custom(e.to_string()))?;
            *masks.borrow_mut() = Some(outputs[1].clone());
            Ok(vec![outputs[0].sum(None)?])
        };
        let mut value_and_grad = mlx_rs::transforms::value_and_grad(loss);
        mlx_rs::random::seed(11).unwrap();
        let (_, grads) = value_and_grad(&[x]).unwrap();
        let mask = masks.borrow().clone().unwrap();
        let kept = mask.sum(None).unwrap().item_exact::<f32>();
        assert!(kept > 8.0 && kept < 56.0, "{kept} of 64 kept");
        assert!(grads[0].all_close(&mask, 0.0, 0.0, None).unwrap());
    }

    #[test]
    fn a_failing_block_is_reported() {
        fn failing(_: &mut Toy, _: &[Array]) -> Result<Vec<Array>> {
            Err(Error::InvalidArgument("no such thing".into()))
        }
        let block = Toy {
            w: Param::new(Array::from_f32(0.0)),
        };
        let err = checkpointed(&block, &[Array::from_f32(1.0)], false, failing).unwrap_err();
        assert!(err.to_string().contains("no such thing"), "{err}");
    }
}

//! Activation checkpointing through MLX's `checkpoint` transform (mlx-c's `mlx_checkpoint`, which
//! mlx-rs 0.33 does not wrap). `checkpoint(f)` computes `f`, but its gradient computes `f` again
//! from its inputs instead of keeping `f`'s intermediate arrays: MLX makes a custom-VJP primitive
//! whose inputs are `f`'s inputs and whose VJP replays `f` (as mlx-lm's `--grad-checkpoint` uses
//! it, per transformer block, with the block's parameters passed as inputs so that their
//! gradients flow through the primitive). Portable: the same transform on Metal, CUDA and the CPU.
//!
//! The Rust function is owned by the MLX closure and freed when MLX drops the last copy (the
//! graph that references it): it runs once when applied and once more when a gradient is built,
//! after the caller has returned, so it must own what it reads.

use std::cell::RefCell;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use mlx_rs::error::Exception;
use mlx_rs::Array;

type ArraysFn = Box<dyn FnMut(&[Array]) -> Result<Vec<Array>, Exception>>;

thread_local! {
    /// The last failure of a checkpointed function, for the error its caller sees (MLX only
    /// says that a closure returned non-zero).
    static LAST_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// `f(inputs)` under MLX's checkpoint transform. Gradients flow to every input (pass the
/// parameters that train as inputs: arrays `f` captures are constants to MLX's autodiff).
pub fn checkpointed(
    f: impl FnMut(&[Array]) -> Result<Vec<Array>, Exception> + 'static,
    inputs: &[Array],
) -> Result<Vec<Array>, Exception> {
    // mlx-rs registers its error handler (which stores MLX's message for the caller instead of
    // mlx-c's default, which exits the process) on its first fallible operation; this module
    // calls mlx-c directly, so make sure it is registered.
    static HANDLER: std::sync::Once = std::sync::Once::new();
    HANDLER.call_once(|| {
        let _ = Array::from_f32(0.0).add(Array::from_f32(0.0));
    });
    let payload: Box<ArraysFn> = Box::new(Box::new(f));
    LAST_ERROR.with(|e| e.borrow_mut().take());
    // SAFETY: the payload is a leaked `Box<ArraysFn>` that mlx-c owns through a shared pointer
    // with `drop_payload` as its deleter; every mlx-c object made here is freed here; arrays
    // handed over are new references (`mlx_vector_array_get`) owned by the `Array`s made of them.
    let (status, outputs) = unsafe {
        let fun = mlx_sys::mlx_closure_new_func_payload(
            Some(call_payload),
            Box::into_raw(payload) as *mut c_void,
            Some(drop_payload),
        );
        let mut ckpt = mlx_sys::mlx_closure_new();
        let mut status = mlx_sys::mlx_checkpoint(&mut ckpt, fun);
        mlx_sys::mlx_closure_free(fun);
        let ins = mlx_sys::mlx_vector_array_new();
        for a in inputs {
            mlx_sys::mlx_vector_array_append_value(ins, a.as_ptr());
        }
        let mut outs = mlx_sys::mlx_vector_array_new();
        if status == 0 {
            status = mlx_sys::mlx_closure_apply(&mut outs, ckpt, ins);
        }
        let mut outputs = Vec::new();
        if status == 0 {
            for i in 0..mlx_sys::mlx_vector_array_size(outs) {
                let mut a = mlx_sys::mlx_array_new();
                if mlx_sys::mlx_vector_array_get(&mut a, outs, i) != 0 {
                    mlx_sys::mlx_array_free(a);
                    status = 1;
                    break;
                }
                outputs.push(Array::from_ptr(a));
            }
        }
        mlx_sys::mlx_vector_array_free(outs);
        mlx_sys::mlx_vector_array_free(ins);
        mlx_sys::mlx_closure_free(ckpt);
        (status, outputs)
    };
    if status != 0 {
        let why = LAST_ERROR
            .with(|e| e.borrow_mut().take())
            .unwrap_or_else(|| "see MLX's message above".into());
        return Err(Exception::from(
            format!("MLX's checkpoint transform failed: {why}").as_str(),
        ));
    }
    Ok(outputs)
}

/// The message of the last checkpointed function that failed on this thread, once: a failure
/// in the backward pass surfaces from MLX's gradient transform without it.
pub fn take_last_error() -> Option<String> {
    LAST_ERROR.with(|e| e.borrow_mut().take())
}

/// mlx-c's closure entry: runs the payload on the input arrays, appends its outputs to `res`.
extern "C" fn call_payload(
    res: *mut mlx_sys::mlx_vector_array,
    input: mlx_sys::mlx_vector_array,
    payload: *mut c_void,
) -> i32 {
    let run = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `payload` is the `Box<ArraysFn>` leaked in `checkpointed`, alive while mlx-c
        // holds the closure; MLX calls it from the thread that builds the graph.
        let f = unsafe { &mut *(payload as *mut ArraysFn) };
        let n = unsafe { mlx_sys::mlx_vector_array_size(input) };
        let mut args = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: a new reference per element, owned by the `Array`.
            unsafe {
                let mut a = mlx_sys::mlx_array_new();
                if mlx_sys::mlx_vector_array_get(&mut a, input, i) != 0 {
                    mlx_sys::mlx_array_free(a);
                    return Err("could not read the checkpointed function's inputs".to_string());
                }
                args.push(Array::from_ptr(a));
            }
        }
        let out = f(&args).map_err(|e| e.what().to_string())?;
        // SAFETY: mlx-c hands an unallocated vector in `res` and frees what it finds there
        // after the call; the new vector holds new references to the outputs.
        unsafe {
            let v = mlx_sys::mlx_vector_array_new();
            for a in &out {
                mlx_sys::mlx_vector_array_append_value(v, a.as_ptr());
            }
            *res = v;
        }
        Ok(())
    }));
    let why = match run {
        Ok(Ok(())) => return 0,
        Ok(Err(why)) => why,
        Err(_) => "the checkpointed function panicked".to_string(),
    };
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(why));
    1
}

/// mlx-c's deleter for the payload, called when its last closure is freed.
extern "C" fn drop_payload(payload: *mut c_void) {
    if !payload.is_null() {
        // SAFETY: made by `Box::into_raw` in `checkpointed`; mlx-c calls the deleter once.
        let _ = catch_unwind(AssertUnwindSafe(|| unsafe {
            drop(Box::from_raw(payload as *mut ArraysFn));
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::transforms::value_and_grad_with_argnums;

    /// The transform computes the function, and its gradients with respect to every input are
    /// those of the function itself, computed after the caller's closure has returned.
    #[test]
    fn gradients_through_the_checkpoint_are_the_function_gradients() {
        fn f(x: &[Array]) -> Result<Vec<Array>, Exception> {
            // sum(sin(x * w) * w): both inputs get gradients.
            Ok(vec![mlx_rs::ops::sin(x[0].multiply(&x[1])?)?
                .multiply(&x[1])?
                .sum(None)?])
        }
        let x = Array::from_slice(&[0.3f32, -1.2, 2.0], &[3]);
        let w = Array::from_slice(&[1.5f32, 0.7, -0.4], &[3]);
        let mut plain = value_and_grad_with_argnums(f, &[0, 1][..]);
        let (v0, g0) = plain(&[x.clone(), w.clone()]).unwrap();
        let mut ck = value_and_grad_with_argnums(|a: &[Array]| checkpointed(f, a), &[0, 1][..]);
        let (v1, g1) = ck(&[x, w]).unwrap();
        assert_eq!(v0[0].item_exact::<f32>(), v1[0].item_exact::<f32>());
        assert_eq!(g0.len(), 2);
        for (a, b) in g0.iter().zip(&g1) {
            let (a, b) = (a.as_slice::<f32>().to_vec(), b.as_slice::<f32>().to_vec());
            assert_eq!(a, b);
            assert!(a.iter().any(|v| *v != 0.0));
        }
    }

    /// A failure inside the function reaches the caller with its message, not a crash.
    #[test]
    fn a_failing_function_is_an_error_naming_why() {
        let x = Array::from_slice(&[1.0f32], &[1]);
        let e = checkpointed(|_| Err(Exception::from("no such layer")), &[x]).unwrap_err();
        assert!(e.what().contains("no such layer"), "{}", e.what());
    }
}

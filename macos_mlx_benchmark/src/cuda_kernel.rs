//! Kernels written for MLX's CUDA backend (`fast::cuda_kernel`): MLX wraps a kernel body in a
//! `__global__` function whose arguments are the named inputs (`const T* name`, with `name_shape`
//! and `name_ndim` where the body uses them) and outputs (`T* name`), compiles it with NVRTC on
//! first use and caches the module by name and template arguments. CUDA only: Metal would need
//! the same body written for `fast::metal_kernel`.

use std::ffi::CString;

use anyhow::{bail, Result};
use mlx_rs::{Array, Dtype, Stream};

/// One kernel, made once and applied to many inputs.
pub struct CudaKernel {
    raw: mlx_sys::mlx_fast_cuda_kernel,
    name: String,
    inputs: usize,
    outputs: usize,
}

impl CudaKernel {
    /// `header` comes before the kernel (device functions); `source` is its body.
    pub fn new(
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        source: &str,
        header: &str,
    ) -> Result<Self> {
        let c_name = CString::new(name)?;
        let source = CString::new(source)?;
        let header = CString::new(header)?;
        let ins: Vec<CString> = inputs
            .iter()
            .map(|s| CString::new(*s))
            .collect::<Result<_, _>>()?;
        let outs: Vec<CString> = outputs
            .iter()
            .map(|s| CString::new(*s))
            .collect::<Result<_, _>>()?;
        // SAFETY: the strings outlive the calls; mlx-c copies them into the kernel object, which
        // `Drop` frees; the name vectors are freed here.
        let raw = unsafe {
            let input_names = mlx_sys::mlx_vector_string_new();
            let output_names = mlx_sys::mlx_vector_string_new();
            for s in &ins {
                mlx_sys::mlx_vector_string_append_value(input_names, s.as_ptr());
            }
            for s in &outs {
                mlx_sys::mlx_vector_string_append_value(output_names, s.as_ptr());
            }
            let raw = mlx_sys::mlx_fast_cuda_kernel_new(
                c_name.as_ptr(),
                input_names,
                output_names,
                source.as_ptr(),
                header.as_ptr(),
                true,
                0,
            );
            mlx_sys::mlx_vector_string_free(output_names);
            mlx_sys::mlx_vector_string_free(input_names);
            raw
        };
        Ok(Self {
            raw,
            name: name.into(),
            inputs: inputs.len(),
            outputs: outputs.len(),
        })
    }

    /// Applies the kernel on the GPU stream: `grid` threads in all (MLX divides them into blocks
    /// of `threads`), outputs of the given shapes and dtypes, `templates` as `using NAME = type;`
    /// in the body. Lazy, as every MLX operation.
    pub fn apply(
        &self,
        inputs: &[&Array],
        outputs: &[(&[i32], Dtype)],
        templates: &[(&str, Dtype)],
        grid: i32,
        threads: i32,
    ) -> Result<Vec<Array>> {
        if inputs.len() != self.inputs || outputs.len() != self.outputs {
            bail!(
                "internal: kernel {} takes {} inputs and {} outputs, given {} and {}",
                self.name,
                self.inputs,
                self.outputs,
                inputs.len(),
                outputs.len()
            );
        }
        let template_names: Vec<CString> = templates
            .iter()
            .map(|(n, _)| CString::new(*n))
            .collect::<Result<_, _>>()?;
        // SAFETY: every mlx-c object made here is freed before returning; the arrays and strings
        // passed in outlive the calls; the output handles are moved into owned `Array`s.
        unsafe {
            let config = mlx_sys::mlx_fast_cuda_kernel_config_new();
            for (dims, dtype) in outputs {
                mlx_sys::mlx_fast_cuda_kernel_config_add_output_arg(
                    config,
                    dims.as_ptr(),
                    dims.len(),
                    *dtype as mlx_sys::mlx_dtype,
                );
            }
            for (name, (_, dtype)) in template_names.iter().zip(templates) {
                mlx_sys::mlx_fast_cuda_kernel_config_add_template_arg_dtype(
                    config,
                    name.as_ptr(),
                    *dtype as mlx_sys::mlx_dtype,
                );
            }
            mlx_sys::mlx_fast_cuda_kernel_config_set_grid(config, grid, 1, 1);
            mlx_sys::mlx_fast_cuda_kernel_config_set_thread_group(config, threads, 1, 1);
            let ins = mlx_sys::mlx_vector_array_new();
            for a in inputs {
                mlx_sys::mlx_vector_array_append_value(ins, a.as_ptr());
            }
            let mut outs = mlx_sys::mlx_vector_array_new();
            let stream = Stream::gpu();
            let status = mlx_sys::mlx_fast_cuda_kernel_apply(
                &mut outs,
                self.raw,
                ins,
                config,
                stream.as_ptr(),
            );
            let mut result = Vec::with_capacity(self.outputs);
            let mut ok = status == 0 && mlx_sys::mlx_vector_array_size(outs) == self.outputs;
            for i in 0..self.outputs {
                if !ok {
                    break;
                }
                let mut out = mlx_sys::mlx_array_new();
                if mlx_sys::mlx_vector_array_get(&mut out, outs, i) == 0 {
                    result.push(Array::from_ptr(out));
                } else {
                    mlx_sys::mlx_array_free(out);
                    ok = false;
                }
            }
            mlx_sys::mlx_vector_array_free(outs);
            mlx_sys::mlx_vector_array_free(ins);
            mlx_sys::mlx_fast_cuda_kernel_config_free(config);
            if !ok {
                bail!(
                    "MLX's custom CUDA kernel {} failed (status {status})",
                    self.name
                );
            }
            Ok(result)
        }
    }
}

impl Drop for CudaKernel {
    fn drop(&mut self) {
        // SAFETY: `raw` was made by `mlx_fast_cuda_kernel_new` and is freed once.
        unsafe {
            mlx_sys::mlx_fast_cuda_kernel_free(self.raw);
        }
    }
}

impl std::fmt::Debug for CudaKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaKernel({})", self.name)
    }
}

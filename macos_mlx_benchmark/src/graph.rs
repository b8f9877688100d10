//! MLX's graph of lazy arrays, counted by operation (`FTB_PROFILE=1` only). On a GPU each
//! operation that is not a view (reshape, transpose, slice, broadcast) is a kernel the host
//! encodes, so the counts say what a change to the step does to the host's work, on any machine.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use mlx_rs::Array;

/// The operations in the graph that computes `outputs`, by MLX's name for each (`Matmul`,
/// `Gather`, ...), from MLX's own printout of the graph (`mlx_print_graph`). Nothing is evaluated.
pub fn count_ops(outputs: &[&Array]) -> Result<BTreeMap<String, usize>> {
    let text = print_graph(outputs)?;
    let mut counts = BTreeMap::new();
    // One line per operation: `Name inputs -> outputs`; then `Inputs: ...` and `Outputs: ...`.
    for line in text.lines().filter(|l| l.contains(" -> ")) {
        if let Some(name) = line.split_whitespace().next() {
            *counts.entry(name.to_string()).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

/// MLX's views: no kernel on any backend (a reshape of a non-contiguous array copies, which the
/// count cannot see).
pub fn is_view(op: &str) -> bool {
    matches!(
        op,
        "Reshape" | "Transpose" | "Slice" | "Broadcast" | "Squeeze" | "ExpandDims" | "Split"
    )
}

fn print_graph(outputs: &[&Array]) -> Result<String> {
    // SAFETY: a temporary FILE that MLX writes through and this function reads back and closes;
    // the vector holds new references to the arrays and is freed here.
    unsafe {
        let f = libc::tmpfile();
        if f.is_null() {
            bail!("no temporary file for MLX's graph printout");
        }
        let v = mlx_sys::mlx_vector_array_new();
        for a in outputs {
            mlx_sys::mlx_vector_array_append_value(v, a.as_ptr());
        }
        let namer = mlx_sys::mlx_node_namer_new();
        let status = mlx_sys::mlx_print_graph(f.cast(), namer, v);
        mlx_sys::mlx_node_namer_free(namer);
        mlx_sys::mlx_vector_array_free(v);
        let mut bytes = Vec::new();
        if status == 0 && libc::fflush(f) == 0 {
            libc::rewind(f);
            let mut buf = [0u8; 1 << 16];
            loop {
                let n = libc::fread(buf.as_mut_ptr().cast(), 1, buf.len(), f);
                if n == 0 {
                    break;
                }
                bytes.extend_from_slice(&buf[..n]);
            }
        }
        libc::fclose(f);
        if status != 0 {
            bail!("MLX could not print the step's graph (status {status})");
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp(a @ b) + a` counts one product, one exponential and one addition.
    #[test]
    fn a_small_graph_counts_each_operation() {
        mlx_rs::Device::set_default(&mlx_rs::Device::cpu());
        let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]);
        let b = Array::from_slice(&[0.5f32, 0.0, 0.0, 0.5], &[2, 2]);
        let y = mlx_rs::ops::exp(a.matmul(&b).unwrap())
            .unwrap()
            .add(&a)
            .unwrap();
        let c = count_ops(&[&y]).unwrap();
        assert_eq!(c.get("Matmul"), Some(&1), "{c:?}");
        assert_eq!(c.get("Exp"), Some(&1), "{c:?}");
        assert_eq!(c.get("Add"), Some(&1), "{c:?}");
        assert_eq!(c.values().sum::<usize>(), 3, "{c:?}");
    }
}

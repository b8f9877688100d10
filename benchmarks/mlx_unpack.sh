# Sourced by benchmarks/mlx_gpu.sh and benchmarks/repro/run_gpu.sh on the device machine (repo
# root): unpacks MLX's CUDA libmlx of the same version as the binary's (0.32.2, packed by
# ../shared/tools/mlx-cuda-pack.sh into .device/mlxpack/) once, to $R/mlx/lib, with MLX's headers
# (its run-time kernel compiler reads them) and the BLAS its RPATH names beside it.
R=/tmp/mlxrt
if [[ ! -f $R/mlx/lib/libmlx.so ]]; then
  mkdir -p $R/mlx/lib
  xz -dc .device/mlxpack/libmlx.so.xz >$R/mlx/lib/libmlx.so
  tar -xJf .device/mlxpack/mlx-include-libs.tar.xz -C $R
fi

// Host side of the CUDA kernels, torch-free so that the host emulation runs it too: the plan of a
// call (element type, index width, tiles, splits, workspace) and the launches of forward and
// backward. Under nvcc a launch is <<<>>>; under PCONV_CUDA_EMULATION the emulator's launch.
// Everything here is capturable in a CUDA graph: the only device memory is the caller's
// workspace, nothing is copied from the host, nothing synchronises.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "layout_kernels.cuh"

namespace partialconv {
namespace cuda {

// The element type a scalar type is multiplied in: 16-bit types on tensor cores, float32 on TF32
// tensor cores when allowed (torch.backends.cudnn.allow_tf32) or exactly on CUDA cores, float64 on
// CUDA cores.
enum class ElementKind { kHalf, kBFloat16, kTf32, kFloat, kDouble };

template <typename scalar_t>
ElementKind element_kind(bool allow_tf32) {
  if constexpr (std::is_same<scalar_t, c10::Half>::value) return ElementKind::kHalf;
  else if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) return ElementKind::kBFloat16;
  else if constexpr (std::is_same<scalar_t, float>::value) return allow_tf32 ? ElementKind::kTf32 : ElementKind::kFloat;
  else return ElementKind::kDouble;
}

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  ConvGeometry geometry;
  Activation activation;
  acc_t negative_slope;
  TensorRef<const scalar_t, int64_t> input, mask, weight;  // mask.data nullptr: no mask
  const scalar_t* bias;                                    // nullptr: no bias
  TensorRef<scalar_t, int64_t> output;
  scalar_t* updated_mask;  // (mask_batch, 1, *out), contiguous
  acc_t* mask_scales;      // contiguous, laid out as mask_scale_rows reads it
};

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  ConvGeometry geometry;
  Activation activation;
  acc_t negative_slope;
  TensorRef<const scalar_t, int64_t> grad_output, input, mask, weight;
  TensorRef<const scalar_t, int64_t> output;  // read only for an activation
  const acc_t* mask_scales;
  TensorRef<scalar_t, int64_t> grad_input;    // data nullptr: not asked for
  scalar_t* grad_weight;                      // (C_out, C_in/g, *kernel) contiguous, or nullptr
  scalar_t* grad_bias;                        // or nullptr
};

// What the device offers the plan.
struct DeviceInfo {
  int multiprocessors = 132;
};

// Index width: 32-bit while every element offset a kernel forms stays below this (the margin
// covers a tile's overhang past the last row and column).
constexpr int64_t kInt32IndexLimit = std::numeric_limits<int32_t>::max() - (int64_t(1) << 20);
// The fewest k-tiles a split of the reduction gets, so that a split's pipeline fills.
constexpr int kMinKTilesPerSplit = 4;
constexpr int kMaxGridY = 65535, kMaxGridZ = 65535;
// Elementwise kernels: threads per block, and blocks of a grid-stride loop at most.
constexpr int kElementwiseThreads = 256;
constexpr int64_t kMaxElementwiseBlocks = 65535;

constexpr int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// The layout of a workspace: named buffers at 256-byte aligned offsets.
struct WorkspaceLayout {
  int64_t bytes = 0;
  int64_t add(int64_t size) {
    const int64_t offset = bytes;
    bytes = round_up(bytes + size, 256);
    return offset;
  }
};

// The split of a GEMM's reduction: enough blocks for a wave of every multiprocessor (two blocks
// each on tensor cores, which fit two per SM), each split at least kMinKTilesPerSplit k-tiles.
struct Split {
  int splits, tiles_per_split;
};

inline Split choose_split(int64_t blocks, int64_t k_tiles, int64_t groups, int blocks_per_multiprocessor,
                          const DeviceInfo& device) {
  const int64_t wanted = ceil_div<int64_t>(int64_t(device.multiprocessors) * blocks_per_multiprocessor, std::max<int64_t>(blocks, 1));
  int64_t splits = std::min(wanted, std::max<int64_t>(1, k_tiles / kMinKTilesPerSplit));
  splits = std::max<int64_t>(1, std::min(splits, kMaxGridZ / groups));
  const int64_t per_split = std::max<int64_t>(1, ceil_div<int64_t>(k_tiles, splits));
  return {int(std::max<int64_t>(1, ceil_div<int64_t>(k_tiles, per_split))), int(per_split)};
}

// One stride phase of grad_input: the input positions whose coordinates are `phase` modulo the
// stride (a grid of `grid` points per image), and the taps that reach them.
struct PhasePlan {
  int64_t phase[kDims], grid[kDims];
  int64_t rows;       // batch * prod(grid)
  int tap_count;
  int k_tiles;
  Split split;
  int64_t blocks;     // of its GEMM launch
};

template <typename index_t>
PhasePlan phase_plan(const ConvShape<index_t>& g, index_t r) {
  PhasePlan plan{};
  index_t phase[kDims];
  phase[2] = r % g.stride[2], phase[1] = r / g.stride[2] % g.stride[1], phase[0] = r / (g.stride[1] * g.stride[2]);
  plan.rows = g.batch;
  for (int d = 0; d < kDims; ++d) {
    plan.phase[d] = phase[d];
    plan.grid[d] = g.in_size[d] > phase[d] ? ceil_div<int64_t>(g.in_size[d] - phase[d], g.stride[d]) : 0;
    plan.rows *= plan.grid[d];
  }
  for (index_t t = 0; t < g.taps(); ++t) {
    index_t tap[kDims], delta[kDims];
    tap_coordinates(g, t, tap);
    plan.tap_count += phase_reaches_tap(g, phase, tap, delta);
  }
  return plan;
}

// Everything the launches of one call need, decided on the host from the shapes alone.
struct ConvPlan {
  bool index64;
  int chunk;                     // elements of a 16-byte chunk
  int block_m, block_n, stages;  // block tile and pipeline depth of the forward and grad_input GEMMs
  int64_t in_padded, out_padded;  // channels per group padded to a chunk multiple
  int64_t taps, phases;
  // Forward
  Split forward_split;
  int64_t forward_blocks;
  // Backward: the grad_input GEMM of every stride phase, and the weight gradient's.
  std::vector<PhasePlan> grad_input_phases;
  Split grad_weight_split;
  int64_t grad_weight_blocks;
  int64_t padded_positions;      // output positions of the batch plus a k-tile (weight gradient)
  // Workspace offsets (bytes)
  WorkspaceLayout workspace;
  int64_t xm, plane, weight_forward, weight_backward, gc, tables, partials, origins;
};

// Block tile of the kernels of an element type, for K-contiguous (forward, grad_input) or
// MN-contiguous (grad_weight) operands.
template <typename E, bool kKContiguous>
struct TileShape {
  using Traits = GemmTraits<E, kKContiguous>;
  static constexpr int kM = Traits::kBlockM, kN = Traits::kBlockN, kK = Traits::kBlockK;
  static constexpr int kBlocksPerMultiprocessor = std::is_same<E, float>::value || std::is_same<E, double>::value ? 1 : 2;
};

template <typename E>
ConvPlan plan_conv(const ConvGeometry& g, const DeviceInfo& device, bool forward,
                   std::initializer_list<int64_t> tensor_extents) {
  using Storage = StorageOf<E>;
  using acc_t = typename GemmTraits<E, true>::Accumulator;
  using Shape = TileShape<E, true>;
  using WeightShape = TileShape<E, false>;
  ConvPlan plan{};
  plan.chunk = kChunkElements<E>;
  plan.block_m = Shape::kM, plan.block_n = Shape::kN, plan.stages = GemmTraits<E, true>::kStages;
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  plan.in_padded = round_up(cin_g, plan.chunk);
  plan.out_padded = round_up(cout_g, plan.chunk);
  plan.taps = g.taps();
  plan.phases = g.stride[0] * g.stride[1] * g.stride[2];
  const int64_t in_pixels = g.in_positions(), out_pixels = g.out_positions();
  const int64_t xm_elements = g.batch * in_pixels * g.groups * plan.in_padded;
  const int64_t gc_elements = g.batch * out_pixels * g.groups * plan.out_padded;
  int64_t extent = 0;
  for (const int64_t e : tensor_extents) extent = std::max(extent, e);

  WorkspaceLayout& w = plan.workspace;
  plan.xm = w.add(xm_elements * int64_t(sizeof(Storage)));
  extent = std::max(extent, xm_elements);
  if (forward) {
    plan.plane = w.add(g.multi_channel_mask() ? g.mask_batch * in_pixels * int64_t(sizeof(acc_t)) : 0);
    const int64_t wf = g.groups * cout_g * plan.taps * plan.in_padded;
    plan.weight_forward = w.add(wf * int64_t(sizeof(Storage)));
    const int64_t rows = g.batch * out_pixels;
    const int64_t blocks = ceil_div<int64_t>(rows, Shape::kM) * ceil_div<int64_t>(cout_g, Shape::kN) * g.groups;
    const int64_t k_tiles = ceil_div<int64_t>(plan.taps * plan.in_padded, Shape::kK);
    plan.forward_split = choose_split(blocks, k_tiles, g.groups, Shape::kBlocksPerMultiprocessor, device);
    plan.forward_blocks = blocks * plan.forward_split.splits;
    const int64_t partials = plan.forward_split.splits > 1 ? g.groups * plan.forward_split.splits * rows * cout_g : 0;
    plan.partials = w.add(partials * int64_t(sizeof(acc_t)));
    extent = std::max({extent, wf, partials, rows * plan.taps});
  } else {
    // GC and the origins of the weight gradient are padded by a k-tile past the last position.
    // (Whole k-tiles, and one more that the last advance of the mainloop reads the origins of.)
    plan.padded_positions = round_up(g.batch * out_pixels, WeightShape::kK) + WeightShape::kK;
    plan.gc = w.add((gc_elements + WeightShape::kK * g.groups * plan.out_padded) * int64_t(sizeof(Storage)));
    const int64_t wd = g.groups * cin_g * plan.taps * plan.out_padded;
    plan.weight_backward = w.add(wd * int64_t(sizeof(Storage)));
    // grad_input: every stride phase its own GEMM, with the taps that reach it; the phases of one
    // launch (up to kMaxPhasesPerLaunch) share the wave, so their split is chosen together.
    for (int64_t r = 0; r < plan.phases; ++r) {
      PhasePlan phase = phase_plan(g, r);
      phase.k_tiles = int(ceil_div<int64_t>(int64_t(phase.tap_count) * plan.out_padded, Shape::kK));
      plan.grad_input_phases.push_back(phase);
    }
    int64_t gi_partials = 0;
    for (size_t first = 0; first < plan.grad_input_phases.size(); first += kMaxPhasesPerLaunch) {
      const size_t last = std::min(plan.grad_input_phases.size(), first + kMaxPhasesPerLaunch);
      int64_t tiles = 0, most_k_tiles = 0;
      for (size_t i = first; i < last; ++i) {
        const PhasePlan& phase = plan.grad_input_phases[i];
        tiles += ceil_div<int64_t>(phase.rows, Shape::kM) * ceil_div<int64_t>(cin_g, Shape::kN) * g.groups;
        most_k_tiles = std::max<int64_t>(most_k_tiles, phase.k_tiles);
      }
      // The launch's split: as for one GEMM of `tiles` blocks, capped per phase by its k-tiles;
      // gridDim.z holds every phase's groups x splits.
      const int wanted = choose_split(tiles, most_k_tiles, g.groups * kMaxPhasesPerLaunch,
                                      Shape::kBlocksPerMultiprocessor, device).splits;
      int64_t launch_partials = 0;
      for (size_t i = first; i < last; ++i) {
        PhasePlan& phase = plan.grad_input_phases[i];
        const int splits = std::max(1, std::min(wanted, phase.k_tiles / kMinKTilesPerSplit));
        const int per_split = std::max(1, ceil_div(phase.k_tiles, splits));
        phase.split = {std::max(1, ceil_div(phase.k_tiles, per_split)), per_split};
        phase.blocks = phase.rows > 0
                           ? ceil_div<int64_t>(phase.rows, Shape::kM) * ceil_div<int64_t>(cin_g, Shape::kN) * g.groups * phase.split.splits
                           : 0;
        if (phase.split.splits > 1 && phase.rows > 0) launch_partials += g.groups * phase.split.splits * phase.rows * cin_g;
      }
      gi_partials = std::max(gi_partials, launch_partials);
    }
    // grad_weight
    const int64_t positions = g.batch * out_pixels;
    const int64_t gw_cols = plan.taps * plan.in_padded;
    const int64_t gw_blocks = ceil_div<int64_t>(cout_g, WeightShape::kM) * ceil_div<int64_t>(gw_cols, WeightShape::kN) * g.groups;
    const int64_t gw_k_tiles = ceil_div<int64_t>(positions, WeightShape::kK);
    plan.grad_weight_split = choose_split(gw_blocks, gw_k_tiles, g.groups, WeightShape::kBlocksPerMultiprocessor, device);
    plan.grad_weight_blocks = gw_blocks * plan.grad_weight_split.splits;
    const int64_t gw_partials =
        plan.grad_weight_split.splits > 1 ? g.groups * plan.grad_weight_split.splits * cout_g * gw_cols : 0;
    plan.partials = w.add(std::max(gi_partials, gw_partials) * int64_t(sizeof(acc_t)));
    plan.origins = w.add(plan.padded_positions * int64_t(sizeof(PositionEntry<int64_t>)));
    extent = std::max({extent, gc_elements, wd, gi_partials, gw_partials, positions * plan.out_padded * g.groups});
  }
  plan.tables = w.add((1 + (forward ? 0 : plan.phases)) * plan.taps * int64_t(sizeof(TapDelta<int64_t>)));
  // Offsets formed from coordinates: the furthest a padded or dilated tap reaches.
  for (int d = 0; d < kDims; ++d)
    extent = std::max(extent, (g.in_size[d] + 2 * g.pad[d] + g.dilation[d] * g.kernel[d]) * g.batch * g.in_channels);
  plan.index64 = extent > kInt32IndexLimit;
  return plan;
}

template <typename T>
T* workspace_at(unsigned char* workspace, int64_t offset) {
  return reinterpret_cast<T*>(workspace + offset);
}

// ---------------------------------------------------------------------------------------------
// Launching.

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   Args&&... args) {
#ifdef PCONV_CUDA_EMULATION
  (void)stream;
  cuda_emulation::launch(kernel, grid, block, shared_bytes, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
#endif
}

// Whether a tensor's channels are its fastest dimension (a channels-last layout): the layout passes
// then read it along channels.
template <typename T>
bool channels_fastest(const TensorRef<T, int64_t>& t) {
  return t.stride[1] == 1 && (t.stride[4] != 1 || t.stride[3] != 1);
}

// Blocks of to_channels_last_kernel: pixel tiles, and images (at most 65535 at a time).
inline dim3 transpose_grid(int64_t pixels, int64_t batch) {
  return dim3(unsigned(ceil_div<int64_t>(pixels, kTransposeTile)), unsigned(std::min<int64_t>(batch, kMaxGridY)));
}

// Blocks of a grid-stride elementwise loop over `count` items.
inline dim3 elementwise_grid(int64_t count) {
  return dim3(unsigned(std::max<int64_t>(1, std::min(ceil_div<int64_t>(count, kElementwiseThreads), kMaxElementwiseBlocks))));
}

// The GEMM kernel of Problem over a grid of row tiles x column tiles x z, with its dynamic shared
// memory (above the 48 KB default: the opt-in attribute, set once per kernel).
template <class Problem, typename AfterLaunch>
void launch_gemm(const typename Problem::Params& params, int64_t rows, int64_t cols, int64_t z, cudaStream_t stream,
                 AfterLaunch&& after_launch) {
  using Traits = typename Problem::Traits;
  if (rows == 0 || cols == 0 || z == 0) return;
  const auto kernel = conv_gemm_kernel<Problem>;
  static const bool attribute_set = [&] {
    const auto status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSharedBytes);
    (void)status;  // a failure shows at the launch, which after_launch checks
    return true;
  }();
  (void)attribute_set;
  const dim3 grid(unsigned(ceil_div<int64_t>(rows, Traits::kBlockM)), unsigned(ceil_div<int64_t>(cols, Traits::kBlockN)),
                  unsigned(z));
  launch_kernel(kernel, grid, dim3(Traits::kThreads), size_t(Traits::kSharedBytes), stream, params);
  after_launch();
}

// The fixed-order sum of the split reduction of one GEMM (phase) of a launch, and its epilogue.
template <class Problem, typename index_t, typename AfterLaunch>
void launch_reduce(const typename Problem::Params& params, int phase, index_t cols, int64_t groups,
                   cudaStream_t stream, AfterLaunch&& after_launch) {
  const auto& part = Problem::reduction(params, phase);
  if (part.splits <= 1 || part.rows == 0) return;
  launch_kernel(reduce_splits_kernel<Problem, index_t>, elementwise_grid(int64_t(part.rows) * cols * groups),
                dim3(kElementwiseThreads), 0, stream, params, phase, cols, int(groups));
  after_launch();
}

template <typename T, typename index_t>
TensorRef<T, index_t> narrow_ref(const TensorRef<T, int64_t>& ref) {
  TensorRef<T, index_t> out;
  out.data = ref.data;
  for (int d = 0; d < 2 + kDims; ++d) out.stride[d] = index_t(ref.stride[d]);
  return out;
}

template <typename index_t>
GridDecode<index_t> grid_of(const index_t (&sizes)[kDims]) {
  return GridDecode<index_t>::make(sizes);
}

// The masked input Xm (and, for a multi-channel mask, the mask's channel sums into plane).
template <typename E, typename scalar_t, typename acc_t, typename index_t, typename AfterLaunch>
void launch_masked_input(const ConvShape<index_t>& g, const TensorRef<const scalar_t, int64_t>& input,
                         const TensorRef<const scalar_t, int64_t>& mask, const ConvPlan& plan, StorageOf<E>* xm,
                         acc_t* plane, cudaStream_t stream, AfterLaunch&& after_launch) {
  if (g.batch == 0) return;
  const MaskedInputSource<scalar_t, acc_t, index_t> source{narrow_ref<const scalar_t, index_t>(input),
                                                           narrow_ref<const scalar_t, index_t>(mask), g.mask_batch,
                                                           g.mask_channels};
  const ChannelsLast<StorageOf<E>, index_t> out{xm, g.in_positions(), g.groups, g.in_channels_per_group(),
                                               index_t(plan.in_padded)};
  const dim3 grid = transpose_grid(g.in_positions(), g.batch);
  const Divider<index_t> padded = Divider<index_t>::make(index_t(plan.in_padded));
  if (plane != nullptr)
    launch_kernel(to_channels_last_kernel<decltype(source), E, acc_t, index_t, true>, grid,
                  dim3(kTransposeTile * kTransposeRows), 0, stream, source, out, g.batch, grid_of(g.in_size), padded,
                  false, plane, g.mask_batch);
  else
    launch_kernel(to_channels_last_kernel<decltype(source), E, acc_t, index_t, false>, grid,
                  dim3(kTransposeTile * kTransposeRows), 0, stream, source, out, g.batch, grid_of(g.in_size), padded,
                  channels_fastest(input), plane, index_t(0));
  after_launch();
}

template <typename E, typename scalar_t, typename acc_t, typename index_t, typename AfterLaunch>
void launch_tables(const ConvShape<index_t>& g, const ConvPlan& plan, unsigned char* workspace, bool backward,
                   cudaStream_t stream, AfterLaunch&& after_launch) {
  const int phases = backward ? int(plan.phases) : 0;
  launch_kernel(tap_table_kernel<index_t>, dim3(unsigned(ceil_div(phases + 1, 128))), dim3(128), 0, stream, g,
                index_t(plan.in_padded), index_t(plan.out_padded),
                workspace_at<TapDelta<index_t>>(workspace, plan.tables), phases);
  after_launch();
}

// The operands of a gather GEMM (conv_problems.cuh): `cols` columns per group; A = `source`, a
// channels-last operand of `groups` groups of `padded` channels over a grid of `extent`, read at
// grid point * scale + offset + tap delta; B = `weight`, rows of taps * padded; epilogue
// coordinates grid point * output_scale (+ the phase's offset).
template <class Problem, typename index_t>
void set_gather_operands(typename Problem::Params& p, index_t cols, const typename Problem::Storage* source,
                         index_t groups, const index_t (&extent)[kDims], index_t padded, const coord_t (&scale)[kDims],
                         const coord_t (&offset)[kDims], const index_t (&output_scale)[kDims],
                         const typename Problem::Storage* weight, index_t taps) {
  const index_t pixel = groups * padded;
  p.cols = cols;
  p.a = source;
  p.a_image = extent[0] * extent[1] * extent[2] * pixel;
  p.a_step[2] = pixel, p.a_step[1] = pixel * extent[2], p.a_step[0] = pixel * extent[2] * extent[1];
  p.a_group = padded;
  for (int d = 0; d < kDims; ++d) {
    p.a_extent[d] = coord_t(extent[d]);
    p.scale[d] = scale[d];
    p.offset[d] = offset[d];
    p.output_scale[d] = output_scale[d];
  }
  p.channels = padded;
  p.step_taps = int(Problem::kBlockK / padded);
  p.step_channels = int(Problem::kBlockK % padded);
  p.b = weight;
  p.b_row = taps * padded;
  p.b_group = cols * p.b_row;
}

// S, ratio and U of every output position (mask_scales, updated_mask), from `plane` (the channel
// sums of a multi-channel mask, contiguous (mask_batch, *in spatial)) or else the mask itself.
template <typename scalar_t, typename acc_t, typename index_t, typename AfterLaunch>
void run_mask_scales(const ConvShape<index_t>& g, const TensorRef<const scalar_t, index_t>& mask, const acc_t* plane,
                     acc_t* mask_scales, scalar_t* updated_mask, cudaStream_t stream, AfterLaunch&& after_launch) {
  const MaskScalesArgs<scalar_t, acc_t, index_t> args{g, grid_of(g.out_size), plane, mask, mask_scales, updated_mask};
  launch_kernel(mask_scales_kernel<scalar_t, acc_t, index_t>, elementwise_grid(int64_t(g.mask_batch) * g.out_positions()),
                dim3(kElementwiseThreads), 0, stream, args);
  after_launch();
}

template <typename E, typename scalar_t, typename acc_t, typename index_t, typename AfterLaunch>
void run_forward(const ForwardArgs<scalar_t, acc_t>& args, const ConvPlan& plan, unsigned char* workspace,
                 cudaStream_t stream, AfterLaunch&& after_launch) {
  using Storage = StorageOf<E>;
  using Problem = GatherGemm<E, scalar_t, index_t, ForwardEpilogue>;
  const ConvShape<index_t> g = args.geometry.template as<index_t>();
  Storage* xm = workspace_at<Storage>(workspace, plan.xm);
  Storage* wf = workspace_at<Storage>(workspace, plan.weight_forward);
  acc_t* plane = args.geometry.multi_channel_mask() ? workspace_at<acc_t>(workspace, plan.plane) : nullptr;
  const TapDelta<index_t>* taps = workspace_at<TapDelta<index_t>>(workspace, plan.tables);

  launch_tables<E, scalar_t, acc_t, index_t>(g, plan, workspace, false, stream, after_launch);
  const index_t cout_g = g.out_channels_per_group(), cin_g = g.in_channels_per_group();
  const int64_t wf_count = int64_t(g.groups) * cout_g * g.taps() * plan.in_padded;
  launch_kernel(weight_layout_kernel<scalar_t, E, acc_t, index_t>, elementwise_grid(wf_count), dim3(kElementwiseThreads),
                0, stream, narrow_ref<const scalar_t, index_t>(args.weight), g, wf, cout_g, cin_g,
                index_t(plan.in_padded), false);
  after_launch();
  launch_masked_input<E, scalar_t, acc_t, index_t>(g, args.input, args.mask, plan, xm, plane, stream, after_launch);

  run_mask_scales<scalar_t, acc_t, index_t>(g, narrow_ref<const scalar_t, index_t>(args.mask), plane, args.mask_scales,
                                            args.updated_mask, stream, after_launch);

  typename Problem::Params p{};
  const coord_t stride[kDims] = {coord_t(g.stride[0]), coord_t(g.stride[1]), coord_t(g.stride[2])};
  const coord_t offset[kDims] = {coord_t(-g.pad[0]), coord_t(-g.pad[1]), coord_t(-g.pad[2])};
  const index_t unit[kDims] = {1, 1, 1};
  set_gather_operands<Problem>(p, cout_g, xm, g.groups, g.in_size, index_t(plan.in_padded), stride, offset, unit, wf,
                               g.taps());
  p.phase_count = 1;
  auto& phase = p.phases[0];
  phase.rows = g.batch * g.out_positions();
  phase.grid = grid_of(g.out_size);
  phase.taps = taps;
  phase.tap_count = int(g.taps());
  phase.k_tiles = int(ceil_div<int64_t>(g.taps() * plan.in_padded, Problem::kBlockK));
  phase.splits = plan.forward_split.splits;
  phase.k_tiles_per_split = plan.forward_split.tiles_per_split;
  phase.partials = {workspace_at<acc_t>(workspace, plan.partials), phase.rows, p.cols};
  p.epilogue = {narrow_ref<scalar_t, index_t>(args.output), args.bias, args.mask_scales, g.mask_batch,
                g.out_positions(), cout_g, args.activation, args.negative_slope};
  launch_gemm<Problem>(p, phase.rows, p.cols, int64_t(g.groups) * phase.splits, stream, after_launch);
  launch_reduce<Problem, index_t>(p, 0, p.cols, g.groups, stream, after_launch);
}

// dL/dbias per output channel (one block each), from the scaled output gradient.
template <typename scalar_t, typename acc_t, typename index_t, typename AfterLaunch>
void launch_grad_bias(const ScaledOutputGradSource<scalar_t, acc_t, index_t>& output_grad, const ConvShape<index_t>& g,
                      scalar_t* grad_bias, cudaStream_t stream, AfterLaunch&& after_launch) {
  launch_kernel(grad_bias_kernel<scalar_t, acc_t, index_t>, dim3(unsigned(g.out_channels)), dim3(kBiasThreads), 0, stream,
                output_grad, g.batch, grad_bias);
  after_launch();
}

template <typename E, typename scalar_t, typename acc_t, typename index_t, typename AfterLaunch>
void run_backward(const BackwardArgs<scalar_t, acc_t>& args, const ConvPlan& plan, unsigned char* workspace,
                  cudaStream_t stream, AfterLaunch&& after_launch) {
  using Storage = StorageOf<E>;
  const ConvShape<index_t> g = args.geometry.template as<index_t>();
  const index_t cout_g = g.out_channels_per_group(), cin_g = g.in_channels_per_group();
  const bool need_input = args.grad_input.data != nullptr, need_weight = args.grad_weight != nullptr;
  Storage* gc = workspace_at<Storage>(workspace, plan.gc);
  const TapDelta<index_t>* tables = workspace_at<TapDelta<index_t>>(workspace, plan.tables);
  const ScaledOutputGradSource<scalar_t, acc_t, index_t> output_grad{
      narrow_ref<const scalar_t, index_t>(args.grad_output), narrow_ref<const scalar_t, index_t>(args.output),
      args.mask_scales, g.mask_batch, g.out_positions(), grid_of(g.out_size), args.activation,
      args.negative_slope};
  if (args.grad_bias != nullptr) launch_grad_bias(output_grad, g, args.grad_bias, stream, after_launch);
  if (!need_input && !need_weight) return;
  launch_tables<E, scalar_t, acc_t, index_t>(g, plan, workspace, true, stream, after_launch);
  if (g.batch > 0) {
    const ChannelsLast<Storage, index_t> out{gc, g.out_positions(), g.groups, cout_g, index_t(plan.out_padded)};
    launch_kernel(to_channels_last_kernel<decltype(output_grad), E, acc_t, index_t, false>,
                  transpose_grid(g.out_positions(), g.batch), dim3(kTransposeTile * kTransposeRows), 0, stream,
                  output_grad, out, g.batch, grid_of(g.out_size), Divider<index_t>::make(index_t(plan.out_padded)),
                  channels_fastest(args.grad_output), static_cast<acc_t*>(nullptr), index_t(0));
    after_launch();
  }
  const index_t gc_pixel = g.groups * index_t(plan.out_padded);

  if (need_input) {
    using Problem = GatherGemm<E, scalar_t, index_t, GradInputEpilogue>;
    Storage* wd = workspace_at<Storage>(workspace, plan.weight_backward);
    const int64_t wd_count = int64_t(g.groups) * cin_g * g.taps() * plan.out_padded;
    launch_kernel(weight_layout_kernel<scalar_t, E, acc_t, index_t>, elementwise_grid(wd_count),
                  dim3(kElementwiseThreads), 0, stream, narrow_ref<const scalar_t, index_t>(args.weight), g, wd, cin_g,
                  cout_g, index_t(plan.out_padded), true);
    after_launch();
    // The stride phases, up to kMaxPhasesPerLaunch per launch; each its own z range.
    typename Problem::Params p{};
    const coord_t unit_scale[kDims] = {1, 1, 1}, no_offset[kDims] = {0, 0, 0};
    const index_t stride[kDims] = {g.stride[0], g.stride[1], g.stride[2]};
    set_gather_operands<Problem>(p, cin_g, gc, g.groups, g.out_size, index_t(plan.out_padded), unit_scale, no_offset,
                                 stride, wd, g.taps());
    p.epilogue = {narrow_ref<scalar_t, index_t>(args.grad_input), narrow_ref<const scalar_t, index_t>(args.mask),
                  g.mask_batch, g.mask_channels, cin_g};
    int64_t partials_offset = 0, rows = 0;
    const auto flush = [&] {
      if (p.phase_count == 0) return;
      const int64_t z = p.phases[p.phase_count - 1].z_begin + int64_t(g.groups) * p.phases[p.phase_count - 1].splits;
      launch_gemm<Problem>(p, rows, p.cols, z, stream, after_launch);
      for (int ph = 0; ph < p.phase_count; ++ph) launch_reduce<Problem, index_t>(p, ph, p.cols, g.groups, stream, after_launch);
      p.phase_count = 0;
      partials_offset = 0;
      rows = 0;
    };
    for (index_t r = 0; r < index_t(plan.phases); ++r) {
      const PhasePlan& planned = plan.grad_input_phases[size_t(r)];
      if (planned.rows == 0) continue;
      auto& phase = p.phases[p.phase_count];
      index_t grid[kDims];
      for (int d = 0; d < kDims; ++d) {
        grid[d] = index_t(planned.grid[d]);
        phase.output_offset[d] = index_t(planned.phase[d]);
      }
      phase.rows = index_t(planned.rows);
      phase.grid = grid_of(grid);
      phase.taps = tables + (1 + r) * g.taps();
      phase.tap_count = planned.tap_count;
      phase.k_tiles = planned.k_tiles;
      phase.splits = planned.split.splits;
      phase.k_tiles_per_split = planned.split.tiles_per_split;
      phase.z_begin = p.phase_count == 0 ? 0 : p.phases[p.phase_count - 1].z_begin + int(g.groups) * p.phases[p.phase_count - 1].splits;
      phase.partials = {workspace_at<acc_t>(workspace, plan.partials) + partials_offset, phase.rows, p.cols};
      if (phase.splits > 1) partials_offset += int64_t(g.groups) * phase.splits * phase.rows * p.cols;
      rows = std::max<int64_t>(rows, phase.rows);
      if (++p.phase_count == kMaxPhasesPerLaunch) flush();
    }
    flush();
  }

  if (need_weight) {
    using Problem = GradWeightGemm<E, scalar_t, index_t>;
    Storage* xm = workspace_at<Storage>(workspace, plan.xm);
    launch_masked_input<E, scalar_t, acc_t, index_t>(g, args.input, args.mask, plan, xm, static_cast<acc_t*>(nullptr),
                                                     stream, after_launch);
    typename Problem::Params p{};
    p.rows = cout_g;
    p.cols = g.taps() * index_t(plan.in_padded);
    p.positions = g.batch * g.out_positions();
    const index_t pixel = g.groups * index_t(plan.in_padded);
    const ChannelSteps<index_t> x_step{{pixel * g.in_size[2] * g.in_size[1], pixel * g.in_size[2], pixel}};
    PositionEntry<index_t>* origins = workspace_at<PositionEntry<index_t>>(workspace, plan.origins);
    const index_t padded = index_t(plan.padded_positions);
    launch_kernel(position_table_kernel<index_t, Storage>, elementwise_grid(int64_t(padded)), dim3(kElementwiseThreads),
                  0, stream, g, grid_of(g.out_size), g.in_positions() * pixel, x_step, origins, padded,
                  gc + int64_t(p.positions) * gc_pixel, gc_pixel);
    after_launch();
    p.origins = origins;
    p.gc = gc;
    p.gc_pixel = gc_pixel;
    p.gc_group = index_t(plan.out_padded);
    p.gc_channels = index_t(plan.out_padded);
    p.x = xm;
    for (int d = 0; d < kDims; ++d) p.x_step[d] = x_step.step[d];
    for (int d = 0; d < kDims; ++d) p.x_extent[d] = coord_t(g.in_size[d]);
    p.x_group = index_t(plan.in_padded);
    p.channels = index_t(plan.in_padded);
    p.taps = tables;
    p.k_tiles = int(ceil_div<int64_t>(p.positions, Problem::kBlockK));
    p.splits = plan.grad_weight_split.splits;
    p.k_tiles_per_split = plan.grad_weight_split.tiles_per_split;
    p.partials = {workspace_at<acc_t>(workspace, plan.partials), p.rows, p.cols};
    p.epilogue = {args.grad_weight, cout_g, cin_g, g.taps(), index_t(plan.in_padded)};
    launch_gemm<Problem>(p, p.rows, p.cols, int64_t(g.groups) * p.splits, stream, after_launch);
    launch_reduce<Problem, index_t>(p, 0, p.cols, g.groups, stream, after_launch);
  }
}

// ---------------------------------------------------------------------------------------------
// The vendor path's passes around ATen's convolution (../vendor_path.h), each one pass over a
// (N, C, *spatial) tensor in its own layout.

template <class Source, typename T, typename index_t, typename AfterLaunch>
void run_strided_pass(const Source& source, const TensorRef<T, int64_t>& out, index_t batch, index_t channels,
                      const index_t (&sizes)[kDims], cudaStream_t stream, AfterLaunch&& after_launch) {
  const index_t count = batch * channels * sizes[0] * sizes[1] * sizes[2];
  if (count == 0) return;
  launch_kernel(strided_pass_kernel<Source, T, index_t>, elementwise_grid(count), dim3(kElementwiseThreads), 0, stream,
                source, narrow_ref<T, index_t>(out), grid_of(sizes), Divider<index_t>::make(channels), count,
                channels_fastest(out));
  after_launch();
}

// out = values * M, exactly 0 where M = 0, over the input's shape: X*M forward, M * dL/dXm backward
// (mask.data nullptr: a copy of values).
template <typename scalar_t, typename acc_t, typename index_t, typename AfterLaunch>
void run_apply_mask(const ConvShape<index_t>& g, const TensorRef<const scalar_t, int64_t>& values,
                    const TensorRef<const scalar_t, int64_t>& mask, const TensorRef<scalar_t, int64_t>& out,
                    cudaStream_t stream, AfterLaunch&& after_launch) {
  const MaskedInputSource<scalar_t, acc_t, index_t> source{narrow_ref<const scalar_t, index_t>(values),
                                                           narrow_ref<const scalar_t, index_t>(mask), g.mask_batch,
                                                           g.mask_channels};
  run_strided_pass(source, out, g.batch, g.in_channels, g.in_size, stream, after_launch);
}

// out = act((conv * ratio + b) * U), 0 in holes, from the convolution's output.
template <typename scalar_t, typename acc_t, typename index_t, typename AfterLaunch>
void run_epilogue(const ConvShape<index_t>& g, const TensorRef<const scalar_t, int64_t>& conv, const scalar_t* bias,
                  const acc_t* mask_scales, Activation activation, acc_t negative_slope,
                  const TensorRef<scalar_t, int64_t>& out, cudaStream_t stream, AfterLaunch&& after_launch) {
  const EpilogueSource<scalar_t, acc_t, index_t> source{narrow_ref<const scalar_t, index_t>(conv), bias, mask_scales,
                                                        g.mask_batch, g.out_positions(), activation, negative_slope};
  run_strided_pass(source, out, g.batch, g.out_channels, g.out_size, stream, after_launch);
}

// dL/dconv = g * act'(out) * ratio * U into grad_conv (grad_conv.data nullptr: not needed), and
// dL/db into grad_bias (nullptr: not needed). output.data nullptr: no activation.
template <typename scalar_t, typename acc_t, typename index_t, typename AfterLaunch>
void run_scale_output_grad(const ConvShape<index_t>& g, const TensorRef<const scalar_t, int64_t>& grad_output,
                           const TensorRef<const scalar_t, int64_t>& output, const acc_t* mask_scales,
                           Activation activation, acc_t negative_slope, const TensorRef<scalar_t, int64_t>& grad_conv,
                           scalar_t* grad_bias, cudaStream_t stream, AfterLaunch&& after_launch) {
  const ScaledOutputGradSource<scalar_t, acc_t, index_t> source{
      narrow_ref<const scalar_t, index_t>(grad_output), narrow_ref<const scalar_t, index_t>(output), mask_scales,
      g.mask_batch, g.out_positions(), grid_of(g.out_size), activation, negative_slope};
  if (grad_bias != nullptr) launch_grad_bias(source, g, grad_bias, stream, after_launch);
  if (grad_conv.data != nullptr) run_strided_pass(source, grad_conv, g.batch, g.out_channels, g.out_size, stream, after_launch);
}

// The element type, index width, tiles and splits a call uses, in words (for forward_path).
inline std::string describe_plan(const ConvPlan& plan, bool forward, const char* core) {
  std::string text = std::string(core) + ", " + std::to_string(plan.block_m) + "x" + std::to_string(plan.block_n) +
                     " block tiles, " + std::to_string(plan.stages) + "-stage cp.async pipeline, " +
                     (plan.index64 ? "64-bit" : "32-bit") + " indexing; ";
  const auto split = [](int splits) {
    return std::to_string(splits) + (splits > 1 ? " slices (a fixed-order sum)" : " slice");
  };
  if (forward) {
    text += "the reduction in " + split(plan.forward_split.splits);
  } else {
    int most = 1;
    for (const PhasePlan& phase : plan.grad_input_phases) most = std::max(most, phase.split.splits);
    text += "grad_input in " + std::to_string(plan.phases) + " stride phase" + (plan.phases > 1 ? "s" : "") +
            " (each with only the taps that reach it), the reduction in up to " + split(most) +
            "; grad_weight: the reduction in " + split(plan.grad_weight_split.splits);
  }
  text += " (enough blocks for every multiprocessor)";
  return text;
}

}  // namespace cuda
}  // namespace partialconv

// Runs the CUDA kernels (csrc/cuda/conv_launch.cuh: the very launches the extension makes) on the
// CPU under the host emulation, for tests/test_cuda_kernels_emulated.py, which builds this with
// the sanitizers, writes a problem, and compares what comes back with the float64 reference.
//
//   run_partial_conv CASE_FILE RESULT_FILE   one forward + backward (formats below)
//   run_partial_conv --vendor CASE_FILE RESULT_FILE
//                                            the same through the vendor path's passes, with a
//                                            naive host convolution in cuDNN's place
//   run_partial_conv --plan CASE_FILE        the blocks of every GEMM launch (float16), per line
//   run_partial_conv --check-dividers        the multiply-high dividers against / and %
//
// CASE_FILE: int64 fields in the order of CaseHeader, then float64 negative_slope, then float64
// arrays in (N, C, *spatial) order: input, mask (if any), weight, bias (if any), grad_output.
// RESULT_FILE: float64 arrays: output, updated_mask, mask_scales, then grad_input, grad_weight,
// grad_bias for those asked for. stdout: the plan, the warp mma instructions of forward and of
// backward, and the bank conflicts of all launches.
#include "cuda_emulation.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdio>
#include <fstream>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/conv_launch.cuh"

namespace {

using partialconv::Activation;
using partialconv::ConvGeometry;
using partialconv::Divider;
using partialconv::kDims;
namespace pc = partialconv::cuda;

struct CaseHeader {
  int64_t dtype;  // 0 float64, 1 float32, 2 float16, 3 bfloat16
  int64_t tf32, index64, channels_last, spatial_dims;
  int64_t batch, in_channels, out_channels, groups;
  int64_t in_size[kDims], kernel[kDims], stride[kDims], pad[kDims], dilation[kDims];
  int64_t mask_batch, mask_channels, has_bias, activation;
  int64_t need_input, need_weight, need_bias, multiprocessors;
  int64_t normalization;  // 0 window, 1 sum (partialconv::Normalization)
};

// A (n, c, *spatial) tensor in memory as the kernels see it: channels-first or channels-last
// strides, stored for 3 spatial dimensions (leading ones of size 1).
template <typename T>
struct Buffer {
  std::vector<T> data;
  int64_t sizes[2 + kDims] = {0, 0, 1, 1, 1}, strides[2 + kDims] = {0, 0, 0, 0, 0};

  Buffer(int64_t n, int64_t c, const int64_t (&spatial)[kDims], bool channels_last) {
    sizes[0] = n, sizes[1] = c;
    for (int d = 0; d < kDims; ++d) sizes[2 + d] = spatial[d];
    data.resize(size_t(numel()));
    if (channels_last) {
      strides[1] = 1, strides[4] = c, strides[3] = spatial[2] * c, strides[2] = spatial[1] * spatial[2] * c;
      strides[0] = spatial[0] * spatial[1] * spatial[2] * c;
    } else {
      strides[4] = 1, strides[3] = spatial[2], strides[2] = spatial[1] * spatial[2];
      strides[1] = spatial[0] * spatial[1] * spatial[2], strides[0] = c * strides[1];
    }
  }
  int64_t numel() const { return sizes[0] * sizes[1] * sizes[2] * sizes[3] * sizes[4]; }
  T& at(int64_t n, int64_t c, const int64_t (&x)[kDims]) {
    return data[size_t(n * strides[0] + c * strides[1] + x[0] * strides[2] + x[1] * strides[3] + x[2] * strides[4])];
  }
  T& at(int64_t i) {  // i: index in (n, c, *spatial) order
    int64_t offset = 0;
    for (int d = 2 + kDims - 1; d >= 0; --d) {
      offset += i % sizes[d] * strides[d];
      i /= sizes[d];
    }
    return data[size_t(offset)];
  }
  template <typename U>
  pc::TensorRef<U, int64_t> ref() {
    pc::TensorRef<U, int64_t> r;
    r.data = data.data();
    for (int d = 0; d < 2 + kDims; ++d) r.stride[d] = strides[d];
    return r;
  }
};

struct Reader {
  std::ifstream in;
  explicit Reader(const char* path) : in(path, std::ios::binary) {
    if (!in) throw std::runtime_error(std::string("cannot open ") + path);
  }
  template <typename T>
  T read() {
    T value;
    if (!in.read(reinterpret_cast<char*>(&value), sizeof(T))) throw std::runtime_error("short case file");
    return value;
  }
  template <typename T>
  void fill(Buffer<T>& buffer) {
    for (int64_t i = 0; i < buffer.numel(); ++i) buffer.at(i) = static_cast<T>(read<double>());
  }
};

struct Writer {
  std::ofstream out;
  explicit Writer(const char* path) : out(path, std::ios::binary) {}
  template <typename T>
  void write(Buffer<T>& buffer) {
    for (int64_t i = 0; i < buffer.numel(); ++i) {
      const double value = static_cast<double>(buffer.at(i));
      out.write(reinterpret_cast<const char*>(&value), sizeof(double));
    }
  }
};

// Bank conflicts of every launch so far (the GEMM kernels are the only ones whose shared-memory
// accesses the emulator counts).
unsigned long long total_conflicts = 0;
const auto after_launch = [] { total_conflicts += cuda_emulation::last_launch_bank_conflicts().total().conflicts(); };

ConvGeometry geometry_of(const CaseHeader& h) {
  ConvGeometry g{};
  g.batch = h.batch, g.in_channels = h.in_channels, g.out_channels = h.out_channels, g.groups = h.groups;
  g.mask_batch = h.mask_batch, g.mask_channels = h.mask_channels, g.spatial_dims = int(h.spatial_dims);
  g.normalization = static_cast<partialconv::Normalization>(h.normalization);
  for (int d = 0; d < kDims; ++d) {
    g.in_size[d] = h.in_size[d], g.kernel[d] = h.kernel[d], g.stride[d] = h.stride[d];
    g.pad[d] = h.pad[d], g.dilation[d] = h.dilation[d];
    g.out_size[d] = partialconv::conv_output_size(g.in_size[d], g.kernel[d], g.stride[d], g.pad[d], g.dilation[d]);
  }
  return g;
}

// The tensors of a case file, in the layout it asks for (bias_size: the bias as a 3-D extent).
template <typename scalar_t>
struct CaseTensors {
  Buffer<scalar_t> input, mask, weight, bias, grad_output;
  int64_t bias_size[kDims];

  CaseTensors(const CaseHeader& h, const ConvGeometry& g, Reader& reader)
      : input(g.batch, g.in_channels, g.in_size, h.channels_last != 0),
        mask(g.mask_channels ? g.mask_batch : 0, g.mask_channels, g.in_size, h.channels_last != 0),
        weight(g.out_channels, g.in_channels / g.groups, g.kernel, false),
        bias(1, 1, {1, 1, h.has_bias ? g.out_channels : 0}, false),
        grad_output(g.batch, g.out_channels, g.out_size, h.channels_last != 0),
        bias_size{1, 1, h.has_bias ? g.out_channels : 0} {
    for (Buffer<scalar_t>* buffer : {&input, &mask, &weight, &bias, &grad_output}) reader.fill(*buffer);
  }
};

// --plan: the blocks of every GEMM launch of forward and backward.
template <typename E>
void print_plan(const CaseHeader& h) {
  const ConvGeometry g = geometry_of(h);
  const pc::DeviceInfo device{int(h.multiprocessors)};
  const pc::ConvPlan forward = pc::plan_conv<E>(g, device, true, {int64_t(0)});
  const pc::ConvPlan backward = pc::plan_conv<E>(g, device, false, {int64_t(0)});
  std::printf("forward %lld\n", (long long)forward.forward_blocks);
  std::printf("grad_weight %lld\n", (long long)backward.grad_weight_blocks);
  // The phases of one launch fill the GPU together.
  const auto& phases = backward.grad_input_phases;
  for (size_t first = 0; first < phases.size(); first += pc::kMaxPhasesPerLaunch) {
    long long blocks = 0;
    for (size_t i = first; i < std::min(phases.size(), first + pc::kMaxPhasesPerLaunch); ++i) blocks += phases[i].blocks;
    std::printf("grad_input %lld\n", blocks);
  }
}

template <typename E, typename scalar_t, typename acc_t>
void run(const CaseHeader& h, double negative_slope, Reader& reader, Writer& writer) {
  const ConvGeometry g = geometry_of(h);
  const bool cl = h.channels_last != 0;
  const int64_t cin_g = g.in_channels / g.groups;
  CaseTensors<scalar_t> tensors(h, g, reader);
  auto& [input, mask, weight, bias, grad_output, bias_size] = tensors;

  Buffer<scalar_t> output(g.batch, g.out_channels, g.out_size, cl);
  Buffer<scalar_t> updated_mask(g.mask_batch, 1, g.out_size, false);
  Buffer<acc_t> mask_scales(g.mask_batch, 2, g.out_size, false);
  const Activation activation = static_cast<Activation>(h.activation);
  const pc::DeviceInfo device{int(h.multiprocessors)};

  pc::ForwardArgs<scalar_t, acc_t> forward{g,
                                           activation,
                                           acc_t(negative_slope),
                                           input.template ref<const scalar_t>(),
                                           g.mask_channels ? mask.template ref<const scalar_t>() : pc::TensorRef<const scalar_t, int64_t>{},
                                           weight.template ref<const scalar_t>(),
                                           h.has_bias ? bias.data.data() : nullptr,
                                           output.template ref<scalar_t>(),
                                           updated_mask.data.data(),
                                           mask_scales.data.data()};
  pc::ConvPlan plan = pc::plan_conv<E>(g, device, true, {int64_t(0)});
  plan.index64 = plan.index64 || h.index64 != 0;
  std::vector<unsigned char> workspace(size_t(plan.workspace.bytes) + 256);
  std::printf("forward: %s\n", pc::describe_plan(plan, true, "emulated").c_str());
  const unsigned long long mma_before_forward = cuda_emulation::warp_mma_instructions();
  if (plan.index64)
    pc::run_forward<E, scalar_t, acc_t, int64_t>(forward, plan, workspace.data(), nullptr, after_launch);
  else
    pc::run_forward<E, scalar_t, acc_t, int32_t>(forward, plan, workspace.data(), nullptr, after_launch);
  std::printf("forward mma instructions: %llu\n", cuda_emulation::warp_mma_instructions() - mma_before_forward);
  writer.write(output);
  writer.write(updated_mask);
  writer.write(mask_scales);

  Buffer<scalar_t> grad_input(g.batch, g.in_channels, g.in_size, cl);
  Buffer<scalar_t> grad_weight(g.out_channels, cin_g, g.kernel, false);
  Buffer<scalar_t> grad_bias(1, 1, bias_size, false);
  pc::BackwardArgs<scalar_t, acc_t> backward{
      g,
      activation,
      acc_t(negative_slope),
      grad_output.template ref<const scalar_t>(),
      input.template ref<const scalar_t>(),
      forward.mask,
      weight.template ref<const scalar_t>(),
      activation == Activation::kNone ? pc::TensorRef<const scalar_t, int64_t>{} : output.template ref<const scalar_t>(),
      mask_scales.data.data(),
      h.need_input ? grad_input.template ref<scalar_t>() : pc::TensorRef<scalar_t, int64_t>{},
      h.need_weight ? grad_weight.data.data() : nullptr,
      h.need_bias && h.has_bias ? grad_bias.data.data() : nullptr};
  plan = pc::plan_conv<E>(g, device, false, {int64_t(0)});
  plan.index64 = plan.index64 || h.index64 != 0;
  workspace.assign(size_t(plan.workspace.bytes) + 256, 0xCD);
  std::printf("backward: %s\n", pc::describe_plan(plan, false, "emulated").c_str());
  const unsigned long long mma_before_backward = cuda_emulation::warp_mma_instructions();
  if (plan.index64)
    pc::run_backward<E, scalar_t, acc_t, int64_t>(backward, plan, workspace.data(), nullptr, after_launch);
  else
    pc::run_backward<E, scalar_t, acc_t, int32_t>(backward, plan, workspace.data(), nullptr, after_launch);
  std::printf("backward mma instructions: %llu\n", cuda_emulation::warp_mma_instructions() - mma_before_backward);
  if (h.need_input) writer.write(grad_input);
  if (h.need_weight) writer.write(grad_weight);
  if (h.need_bias && h.has_bias) writer.write(grad_bias);
  std::printf("bank conflicts: %llu\n", total_conflicts);
}

// f(n, co, o, ci, ci_g, t, x) for every term of the convolution whose input position x = o * stride
// - pad + t * dilation lies inside the input: output (n, co, o), input channel ci (ci_g within its
// group), tap t.
template <typename F>
void for_each_term(const ConvGeometry& g, F&& f) {
  const int64_t cin_g = g.in_channels / g.groups, cout_g = g.out_channels / g.groups;
  int64_t o[kDims], t[kDims], x[kDims];
  for (int64_t n = 0; n < g.batch; ++n)
    for (int64_t co = 0; co < g.out_channels; ++co)
      for (o[0] = 0; o[0] < g.out_size[0]; ++o[0])
        for (o[1] = 0; o[1] < g.out_size[1]; ++o[1])
          for (o[2] = 0; o[2] < g.out_size[2]; ++o[2])
            for (int64_t ci_g = 0; ci_g < cin_g; ++ci_g)
              for (t[0] = 0; t[0] < g.kernel[0]; ++t[0])
                for (t[1] = 0; t[1] < g.kernel[1]; ++t[1])
                  for (t[2] = 0; t[2] < g.kernel[2]; ++t[2]) {
                    bool inside = true;
                    for (int d = 0; d < kDims; ++d) {
                      x[d] = o[d] * g.stride[d] - g.pad[d] + t[d] * g.dilation[d];
                      inside = inside && x[d] >= 0 && x[d] < g.in_size[d];
                    }
                    if (inside) f(n, co, o, co / cout_g * cin_g + ci_g, ci_g, t, x);
                  }
}

// --vendor: forward and backward as the vendor path runs them (csrc/vendor_path.cpp), its passes
// under the emulation and the convolution, which the extension leaves to ATen, naively here in
// acc_t with its result stored in scalar_t, as cuDNN's. Results as for the fused kernels.
template <typename scalar_t, typename acc_t, typename index_t>
void run_vendor(const CaseHeader& h, double negative_slope, Reader& reader, Writer& writer) {
  const ConvGeometry g = geometry_of(h);
  const partialconv::ConvShape<index_t> gi = g.as<index_t>();
  const bool cl = h.channels_last != 0;
  const int64_t cin_g = g.in_channels / g.groups;
  CaseTensors<scalar_t> tensors(h, g, reader);
  auto& [input, mask, weight, bias, grad_output, bias_size] = tensors;
  const Activation activation = static_cast<Activation>(h.activation);
  const auto mask_ref = g.mask_channels ? mask.template ref<const scalar_t>() : pc::TensorRef<const scalar_t, int64_t>{};

  // The mask scales by the fused kernels' own kernel, from the channel sums of a multi-channel mask
  // (the extension sums with ATen).
  Buffer<scalar_t> updated_mask(g.mask_batch, 1, g.out_size, false);
  Buffer<acc_t> mask_scales(g.mask_batch, 2, g.out_size, false);
  std::vector<acc_t> plane;
  if (g.multi_channel_mask()) {
    plane.assign(size_t(g.mask_batch * g.in_positions()), acc_t(0));
    int64_t x[kDims];
    for (int64_t n = 0; n < g.mask_batch; ++n)
      for (x[0] = 0; x[0] < g.in_size[0]; ++x[0])
        for (x[1] = 0; x[1] < g.in_size[1]; ++x[1])
          for (x[2] = 0; x[2] < g.in_size[2]; ++x[2])
            for (int64_t c = 0; c < g.in_channels; ++c)
              plane[size_t(n * g.in_positions() + (x[0] * g.in_size[1] + x[1]) * g.in_size[2] + x[2])] +=
                  acc_t(mask.at(n, c, x));
  }
  pc::run_mask_scales<scalar_t, acc_t, index_t>(gi, pc::narrow_ref<const scalar_t, index_t>(mask_ref),
                                                plane.empty() ? nullptr : plane.data(), mask_scales.data.data(),
                                                updated_mask.data.data(), nullptr, after_launch);
  // Xm = X*M, the convolution, the epilogue.
  Buffer<scalar_t> masked(g.batch, g.in_channels, g.in_size, cl);
  pc::run_apply_mask<scalar_t, acc_t, index_t>(gi, input.template ref<const scalar_t>(), mask_ref,
                                               masked.template ref<scalar_t>(), nullptr, after_launch);
  Buffer<acc_t> conv_sum(g.batch, g.out_channels, g.out_size, false);
  for_each_term(g, [&](int64_t n, int64_t co, const int64_t(&o)[kDims], int64_t ci, int64_t ci_g,
                       const int64_t(&t)[kDims], const int64_t(&x)[kDims]) {
    conv_sum.at(n, co, o) += acc_t(masked.at(n, ci, x)) * acc_t(weight.at(co, ci_g, t));
  });
  Buffer<scalar_t> conv(g.batch, g.out_channels, g.out_size, cl), output(g.batch, g.out_channels, g.out_size, cl);
  for (int64_t i = 0; i < conv.numel(); ++i) conv.at(i) = static_cast<scalar_t>(conv_sum.at(i));
  pc::run_epilogue<scalar_t, acc_t, index_t>(gi, conv.template ref<const scalar_t>(), h.has_bias ? bias.data.data() : nullptr,
                                             mask_scales.data.data(), activation, acc_t(negative_slope),
                                             output.template ref<scalar_t>(), nullptr, after_launch);
  writer.write(output);
  writer.write(updated_mask);
  writer.write(mask_scales);

  // dL/dconv and dL/db, the convolution's backward, dL/dX = M * dL/dXm.
  Buffer<scalar_t> grad_conv(g.batch, g.out_channels, g.out_size, cl);
  Buffer<scalar_t> grad_bias(1, 1, bias_size, false);
  const auto output_ref = activation == Activation::kNone ? pc::TensorRef<const scalar_t, int64_t>{}
                                                          : output.template ref<const scalar_t>();
  pc::run_scale_output_grad<scalar_t, acc_t, index_t>(
      gi, grad_output.template ref<const scalar_t>(), output_ref, mask_scales.data.data(), activation,
      acc_t(negative_slope), grad_conv.template ref<scalar_t>(), h.need_bias && h.has_bias ? grad_bias.data.data() : nullptr,
      nullptr, after_launch);
  Buffer<acc_t> grad_masked_sum(g.batch, g.in_channels, g.in_size, false), grad_weight_sum(g.out_channels, cin_g, g.kernel, false);
  for_each_term(g, [&](int64_t n, int64_t co, const int64_t(&o)[kDims], int64_t ci, int64_t ci_g,
                       const int64_t(&t)[kDims], const int64_t(&x)[kDims]) {
    const acc_t grad = acc_t(grad_conv.at(n, co, o));
    grad_masked_sum.at(n, ci, x) += grad * acc_t(weight.at(co, ci_g, t));
    grad_weight_sum.at(co, ci_g, t) += grad * acc_t(masked.at(n, ci, x));
  });
  Buffer<scalar_t> grad_masked(g.batch, g.in_channels, g.in_size, cl), grad_input(g.batch, g.in_channels, g.in_size, cl);
  Buffer<scalar_t> grad_weight(g.out_channels, cin_g, g.kernel, false);
  for (int64_t i = 0; i < grad_masked.numel(); ++i) grad_masked.at(i) = static_cast<scalar_t>(grad_masked_sum.at(i));
  for (int64_t i = 0; i < grad_weight.numel(); ++i) grad_weight.at(i) = static_cast<scalar_t>(grad_weight_sum.at(i));
  pc::run_apply_mask<scalar_t, acc_t, index_t>(gi, grad_masked.template ref<const scalar_t>(), mask_ref,
                                               grad_input.template ref<scalar_t>(), nullptr, after_launch);
  if (h.need_input) writer.write(grad_input);
  if (h.need_weight) writer.write(grad_weight);
  if (h.need_bias && h.has_bias) writer.write(grad_bias);
  std::printf("bank conflicts: %llu\n", total_conflicts);
}

template <typename scalar_t, typename acc_t>
void run_vendor_any_index(const CaseHeader& h, double negative_slope, Reader& reader, Writer& writer) {
  if (h.index64)
    run_vendor<scalar_t, acc_t, int64_t>(h, negative_slope, reader, writer);
  else
    run_vendor<scalar_t, acc_t, int32_t>(h, negative_slope, reader, writer);
}

template <typename index_t>
int check_dividers() {
  std::mt19937_64 rng(7);
  const index_t top = std::numeric_limits<index_t>::max();
  std::vector<index_t> divisors{1, 2, 3, 5, 7, 9, 25, 49, 64, 100, 127, 255, 256, 1000, 4095, 65537};
  for (int i = 0; i < 200; ++i) divisors.push_back(index_t(rng() % uint64_t(top)) + 1);
  divisors.push_back(top);
  divisors.push_back(top / 2 + 1);
  int failures = 0;
  for (const index_t d : divisors) {
    const Divider<index_t> divider = Divider<index_t>::make(d);
    std::vector<index_t> values{0, 1, d - 1, d, top, top - 1, top / d * d, top / d * d - 1};
    for (int i = 0; i < 2000; ++i) values.push_back(index_t(rng() % (uint64_t(top) + 1)));
    for (int i = 0; i < 200; ++i) values.push_back(index_t(rng() % 100000));
    for (const index_t n : values) {
      if (n < 0) continue;
      if (divider.div(n) != n / d || divider.mod(n) != n % d) {
        if (++failures < 10)
          std::printf("divider %lld: %lld / %lld gave %lld\n", (long long)(8 * sizeof(index_t)), (long long)n,
                      (long long)d, (long long)divider.div(n));
      }
    }
  }
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "--check-dividers") {
    const int failures = check_dividers<int32_t>() + check_dividers<int64_t>();
    std::printf("dividers: %d failures\n", failures);
    return failures == 0 ? 0 : 1;
  }
  const bool vendor = argc == 4 && std::string(argv[1]) == "--vendor";
  if (argc != 3 && !vendor) {
    std::fprintf(stderr, "usage: %s [--vendor] CASE_FILE RESULT_FILE | --plan CASE_FILE | --check-dividers\n", argv[0]);
    return 2;
  }
  if (vendor) ++argv;  // CASE_FILE RESULT_FILE follow
  const bool plan_only = std::string(argv[1]) == "--plan";
  Reader reader(argv[plan_only ? 2 : 1]);
  CaseHeader h;
  int64_t* fields = reinterpret_cast<int64_t*>(&h);
  for (size_t i = 0; i < sizeof(CaseHeader) / sizeof(int64_t); ++i) fields[i] = reader.read<int64_t>();
  if (plan_only) {
    print_plan<c10::Half>(h);
    return 0;
  }
  const double slope = reader.read<double>();
  Writer writer(argv[2]);
  if (vendor) {  // the passes run in the operands' type; TF32 concerns only the fused kernels
    switch (h.dtype) {
      case 0: run_vendor_any_index<double, double>(h, slope, reader, writer); break;
      case 1: run_vendor_any_index<float, float>(h, slope, reader, writer); break;
      case 2: run_vendor_any_index<c10::Half, float>(h, slope, reader, writer); break;
      case 3: run_vendor_any_index<c10::BFloat16, float>(h, slope, reader, writer); break;
      default: std::fprintf(stderr, "unknown dtype %lld\n", (long long)h.dtype); return 2;
    }
    return writer.out.good() ? 0 : 1;
  }
  switch (h.dtype) {
    case 0: run<double, double, double>(h, slope, reader, writer); break;
    case 1:
      if (h.tf32)
        run<pc::Tf32, float, float>(h, slope, reader, writer);
      else
        run<float, float, float>(h, slope, reader, writer);
      break;
    case 2: run<c10::Half, c10::Half, float>(h, slope, reader, writer); break;
    case 3: run<c10::BFloat16, c10::BFloat16, float>(h, slope, reader, writer); break;
    default: std::fprintf(stderr, "unknown dtype %lld\n", (long long)h.dtype); return 2;
  }
  return writer.out.good() ? 0 : 1;
}

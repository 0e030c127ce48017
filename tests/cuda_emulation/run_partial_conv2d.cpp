// Runs the CUDA kernels of csrc/cuda/partial_conv2d_kernels.cuh on the CPU under the host
// emulation, for tests/test_cuda_kernels_emulated.py, which builds it with ASan/UBSan (or TSan),
// writes a problem, and compares what comes back with the float64 reference.
//
//   run_partial_conv2d CASE_FILE RESULT_FILE   one forward + backward (formats below)
//   run_partial_conv2d --check-dividers        the multiply-high dividers against / and %
//
// CASE_FILE: int64 fields in the order of CaseHeader, then float64 negative_slope, then float64
// arrays in NCHW order: input, mask (if any), weight, bias (if any), grad_output.
// RESULT_FILE: float64 arrays in NCHW order: output, updated_mask, mask_scales, then grad_input,
// grad_weight, grad_bias for those asked for.
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

#include "cuda/partial_conv2d_kernels.cuh"

namespace {

using partialconv::Activation;
using partialconv::ConvGeometry;
using partialconv::Divider;
namespace pc = partialconv::cuda;

struct CaseHeader {
  int64_t dtype;  // 0 float64, 1 float32, 2 float16, 3 bfloat16
  int64_t index64, channels_last;
  int64_t batch, in_channels, in_height, in_width, out_channels, kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups;
  int64_t mask_batch, mask_channels, has_bias, activation;
  int64_t need_input, need_weight, need_bias, multiprocessors;
};

// A 4-D tensor in memory as the kernels see it: NCHW or channels_last strides.
template <typename T>
struct Buffer {
  std::vector<T> data;
  int64_t sizes[4] = {0, 0, 0, 0}, strides[4] = {0, 0, 0, 0};

  Buffer(int64_t n, int64_t c, int64_t h, int64_t w, bool channels_last)
      : data(size_t(n * c * h * w)), sizes{n, c, h, w} {
    if (channels_last) {
      strides[1] = 1, strides[3] = c, strides[2] = w * c, strides[0] = h * w * c;
    } else {
      strides[3] = 1, strides[2] = w, strides[1] = h * w, strides[0] = c * h * w;
    }
  }
  T& at(int64_t i) {  // i: index in NCHW order
    const int64_t w = i % sizes[3], h = i / sizes[3] % sizes[2];
    const int64_t c = i / (sizes[2] * sizes[3]) % sizes[1], n = i / (sizes[1] * sizes[2] * sizes[3]);
    return data[size_t(n * strides[0] + c * strides[1] + h * strides[2] + w * strides[3])];
  }
  int64_t numel() const { return sizes[0] * sizes[1] * sizes[2] * sizes[3]; }
  template <typename U>
  pc::TensorArg<U> arg() {
    pc::TensorArg<U> a;
    a.data = data.data();
    for (int d = 0; d < 4; ++d) a.strides[d] = strides[d];
    return a;
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

template <typename scalar_t, typename acc_t, typename index_t>
void run(const CaseHeader& h, double negative_slope, Reader& reader, Writer& writer) {
  // A 2-D problem: a leading unit depth.
  ConvGeometry g{};
  g.batch = h.batch, g.in_channels = h.in_channels, g.out_channels = h.out_channels;
  g.groups = h.groups, g.mask_batch = h.mask_batch, g.mask_channels = h.mask_channels;
  g.spatial_dims = 2;
  const int64_t in_size[] = {1, h.in_height, h.in_width}, kernel[] = {1, h.kernel_h, h.kernel_w};
  const int64_t stride[] = {1, h.stride_h, h.stride_w}, pad[] = {0, h.pad_h, h.pad_w};
  const int64_t dilation[] = {1, h.dilation_h, h.dilation_w};
  for (int d = 0; d < partialconv::kDims; ++d) {
    g.in_size[d] = in_size[d], g.kernel[d] = kernel[d], g.stride[d] = stride[d];
    g.pad[d] = pad[d], g.dilation[d] = dilation[d];
    g.out_size[d] = partialconv::conv_output_size(in_size[d], kernel[d], stride[d], pad[d], dilation[d]);
  }
  const bool cl = h.channels_last != 0;
  const int64_t cin_g = g.in_channels / g.groups;

  Buffer<scalar_t> input(g.batch, g.in_channels, g.in_size[1], g.in_size[2], cl);
  Buffer<scalar_t> mask(g.mask_channels ? g.mask_batch : 0, g.mask_channels, g.in_size[1], g.in_size[2], cl);
  Buffer<scalar_t> weight(g.out_channels, cin_g, g.kernel[1], g.kernel[2], false);
  Buffer<scalar_t> bias(1, 1, 1, h.has_bias ? g.out_channels : 0, false);
  Buffer<scalar_t> grad_output(g.batch, g.out_channels, g.out_size[1], g.out_size[2], cl);
  reader.fill(input);
  reader.fill(mask);
  reader.fill(weight);
  reader.fill(bias);
  reader.fill(grad_output);

  Buffer<scalar_t> output(g.batch, g.out_channels, g.out_size[1], g.out_size[2], cl);
  Buffer<scalar_t> updated_mask(g.mask_batch, 1, g.out_size[1], g.out_size[2], false);
  Buffer<acc_t> mask_scales(g.mask_batch, 2, g.out_size[1], g.out_size[2], false);
  const Activation activation = static_cast<Activation>(h.activation);

  pc::ForwardArgs<scalar_t, acc_t> forward{g,
                                           activation,
                                           acc_t(negative_slope),
                                           input.template arg<const scalar_t>(),
                                           g.mask_channels ? mask.template arg<const scalar_t>() : pc::TensorArg<const scalar_t>{},
                                           weight.template arg<const scalar_t>(),
                                           h.has_bias ? bias.data.data() : nullptr,
                                           output.template arg<scalar_t>(),
                                           updated_mask.data.data(),
                                           mask_scales.data.data()};
  pc::launch_forward<scalar_t, acc_t, index_t>(forward, nullptr);
  writer.write(output);
  writer.write(updated_mask);
  writer.write(mask_scales);

  Buffer<scalar_t> grad_input(g.batch, g.in_channels, g.in_size[1], g.in_size[2], cl);
  Buffer<scalar_t> grad_weight(g.out_channels, cin_g, g.kernel[1], g.kernel[2], false);
  Buffer<scalar_t> grad_bias(1, 1, 1, g.out_channels, false);
  const int64_t splits = pc::grad_weight_splits<scalar_t>(g, h.multiprocessors);
  std::vector<acc_t> workspace(size_t(pc::grad_weight_workspace_elements(g, splits)));
  pc::BackwardArgs<scalar_t, acc_t> backward{
      g,
      activation,
      acc_t(negative_slope),
      grad_output.template arg<const scalar_t>(),
      input.template arg<const scalar_t>(),
      forward.mask,
      weight.template arg<const scalar_t>(),
      activation == Activation::kNone ? pc::TensorArg<const scalar_t>{} : output.template arg<const scalar_t>(),
      mask_scales.data.data(),
      grad_input.template arg<scalar_t>(),
      grad_weight.data.data(),
      grad_bias.data.data(),
      workspace.data(),
      splits};
  pc::launch_backward<scalar_t, acc_t, index_t>(backward, h.need_input != 0, h.need_weight != 0,
                                                h.need_bias != 0, nullptr, [] {});
  if (h.need_input) writer.write(grad_input);
  if (h.need_weight) writer.write(grad_weight);
  if (h.need_bias) writer.write(grad_bias);
}

template <typename scalar_t, typename acc_t>
void run_index(const CaseHeader& h, double slope, Reader& reader, Writer& writer) {
  if (h.index64)
    run<scalar_t, acc_t, int64_t>(h, slope, reader, writer);
  else
    run<scalar_t, acc_t, int32_t>(h, slope, reader, writer);
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
          std::printf("divider %lld: %lld / %lld gave %lld\n", (long long)(8 * sizeof(index_t)),
                      (long long)n, (long long)d, (long long)divider.div(n));
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
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s CASE_FILE RESULT_FILE | --check-dividers\n", argv[0]);
    return 2;
  }
  Reader reader(argv[1]);
  CaseHeader h;
  int64_t* fields = reinterpret_cast<int64_t*>(&h);
  for (size_t i = 0; i < sizeof(CaseHeader) / sizeof(int64_t); ++i) fields[i] = reader.read<int64_t>();
  const double slope = reader.read<double>();
  Writer writer(argv[2]);
  switch (h.dtype) {
    case 0: run_index<double, double>(h, slope, reader, writer); break;
    case 1: run_index<float, float>(h, slope, reader, writer); break;
    case 2: run_index<c10::Half, float>(h, slope, reader, writer); break;
    case 3: run_index<c10::BFloat16, float>(h, slope, reader, writer); break;
    default: std::fprintf(stderr, "unknown dtype %lld\n", (long long)h.dtype); return 2;
  }
  return writer.out.good() ? 0 : 1;
}

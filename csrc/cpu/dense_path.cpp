// Dense path: bands along the first spatial dimension of the tensors (the "band axis": the depth
// in 3-D, the height in 2-D, the length in 1-D). Each band's input slab is copied once with the
// mask applied (a band at a time, at most about kBandElements: X*M of a large batch never exists
// as a whole tensor) and fed to ATen's convolution (oneDNN), whose direct convolution reads each
// input once instead of prod(kernel) times as the packed columns do; the epilogue then applies
// ratio, bias, U and activation. Slabs of output positions that are all holes skip the
// convolution; images that are one band each are copied and convolved together, as one batch.
// Where X*M is X (no mask, or a mask of ones: deep layers see no holes) and a band is whole
// images already laid out as the band, the input itself is the band (no copy).
// Backward goes through at::convolution_backward band by band. Bands are copied channels-first
// or channels-last, whichever oneDNN convolves faster for the layer's shape (channels_last_bands;
// forward only); a strided layer's input gradient may be made channels-last in a call of its own
// (channels_last_input_gradient).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "cpu_common.h"
#include "mask_scales.h"
#include "paths.h"

namespace partialconv {
namespace cpu {
namespace {

// Elements of one band's masked input copy (unless a single band-axis index needs more): 2^23 (32
// MB in float32), so that the whole image or clip of most layers is one band, which is then the
// very convolution conv2d / conv3d would run. (2^21 cut the video suite's 3-D clips into bands of
// a few frames, each band copying and convolving kernel depth - 1 frames again: its dec1 ran 3.4x
// slower than now.)
constexpr int64_t kBandElements = int64_t(1) << 23;

int band_axis(const ConvGeometry& g) { return kDims - g.spatial_dims; }

// Positions per band-axis index: the product of the extents after the band axis.
int64_t slab_positions(const int64_t (&sizes)[kDims], int axis) {
  int64_t positions = 1;
  for (int d = axis + 1; d < kDims; ++d) positions *= sizes[d];
  return positions;
}

// The input indices along the band axis that a band of output indices reads: `count` indices
// from `first` are copied (those outside the input as zeros), and `pad` more zero indices on
// either side are left to the convolution's own padding. The padding both sides share is passed
// on rather than copied, so that a band covering the whole input is the very convolution that
// conv2d would run (oneDNN's choice of algorithm depends on the shape: dec7's 1024->512 3x3 at
// 4x4 ran 1.7x slower with explicit zero rows).
struct RowSpan {
  int64_t first, count, pad;
};

RowSpan input_rows(const ConvGeometry& g, int64_t begin, int64_t end) {
  const int a = band_axis(g);
  // A band of every output index reads the whole input with the layer's own padding, also where
  // a stride leaves one side's padding unused (the span below would then copy a zero index on the
  // other side and pass no padding: not the convolution conv2d runs, and its input gradient not
  // the image's).
  if (begin == 0 && end == g.out_size[a]) return {0, g.in_size[a], g.pad[a]};
  const int64_t first = begin * g.stride[a] - g.pad[a];
  const int64_t count = (end - begin - 1) * g.stride[a] + g.dilation[a] * (g.kernel[a] - 1) + 1;
  const int64_t pad = std::max<int64_t>(0, std::min(-first, first + count - g.in_size[a]));
  return {first + pad, count - 2 * pad, pad};
}

// Output indices [begin, end) along the band axis of one image, processed together.
struct Band {
  int64_t begin, end;
};

// Output indices per band: about kBandElements of masked input copy, at least one. Computed in
// floating point: the element count of a band can pass int64 for absurd strides.
int64_t most_band_rows(const ConvGeometry& g) {
  const int a = band_axis(g);
  const double per_row = double(g.in_channels) * double(slab_positions(g.in_size, a)) * double(g.stride[a]);
  const double rows = per_row > 0 ? double(kBandElements) / per_row : double(g.out_size[a]);
  return std::max<int64_t>(1, int64_t(std::min(rows, double(g.out_size[a]))));
}

// Runs of band-axis output indices whose slab holds a position that is not a hole, split to at
// most most_band_rows() each.
template <typename acc_t>
std::vector<Band> plan_bands(ImageScales<acc_t> scales, const ConvGeometry& g) {
  const int a = band_axis(g);
  const int64_t most = most_band_rows(g), slab = slab_positions(g.out_size, a);
  std::vector<Band> bands;
  for (int64_t o = 0; o < g.out_size[a]; ++o) {
    bool any_valid = false;
    for (int64_t p = o * slab; p < (o + 1) * slab && !any_valid; ++p) any_valid = !scales.is_hole(p);
    if (!any_valid) continue;
    if (!bands.empty() && bands.back().end == o && o - bands.back().begin < most)
      bands.back().end = o + 1;
    else
      bands.push_back({o, o + 1});
  }
  return bands;
}

// Whether a plan is the one band of the whole output.
bool whole_image(const std::vector<Band>& bands, const ConvGeometry& g) {
  return bands.size() == 1 && bands[0].begin == 0 && bands[0].end == g.out_size[band_axis(g)];
}

// The band plans of every mask image (one when the mask is shared by the batch).
template <typename acc_t>
std::vector<std::vector<Band>> plan_all_bands(const at::Tensor& mask_scales, const ConvGeometry& g) {
  std::vector<std::vector<Band>> plans;
  for (int64_t nm = 0; nm < g.mask_batch; ++nm) plans.push_back(plan_bands(image_scales<acc_t>(mask_scales, g, nm), g));
  return plans;
}

// How many images from image n on are convolved together, as one batched band: consecutive images
// whose plan is the whole image, at most kBandElements of masked input in all. oneDNN convolves a
// batch of small images far faster than the same images one at a time (dec8's 1024->512 3x3 at
// 2x2, batch 8, 2 threads: 31 ms image by image, 7 ms as conv2d's batch).
int64_t images_in_band(const std::vector<std::vector<Band>>& plans, const ConvGeometry& g, int64_t n) {
  const auto plan = [&](int64_t i) -> const std::vector<Band>& { return plans[size_t(g.mask_batch == 1 ? 0 : i)]; };
  const double per_image = double(g.in_channels) * double(g.in_positions());
  const int64_t most = per_image > 0 ? int64_t(std::min(double(g.batch), double(kBandElements) / per_image)) : 1;
  int64_t images = 1;
  if (whole_image(plan(n), g))
    while (images < most && n + images < g.batch && whole_image(plan(n + images), g)) ++images;
  return images;
}

// A box of positions [lo, hi) per dimension; its lines are the (depth, height) pairs, each a run
// along the width. Stored contiguously, line (d, h) starts at ((d - lo0) * extent1 + h - lo1) *
// extent2.
struct Box {
  int64_t lo[kDims], hi[kDims];
  int64_t extent(int d) const { return hi[d] - lo[d]; }
  int64_t lines() const { return extent(0) * extent(1); }
  int64_t positions() const { return lines() * extent(2); }
  int64_t depth(int64_t line) const { return lo[0] + line / extent(1); }
  int64_t height(int64_t line) const { return lo[1] + line % extent(1); }
};

// The box that spans [begin, end) along the band axis and all of `sizes` along the others.
Box band_box(const ConvGeometry& g, const int64_t (&sizes)[kDims], int64_t begin, int64_t end) {
  Box box{};
  for (int d = 0; d < kDims; ++d) box.lo[d] = 0, box.hi[d] = sizes[d];
  box.lo[band_axis(g)] = begin;
  box.hi[band_axis(g)] = end;
  return box;
}

// {images, channels, extents of the box along the tensors' spatial dimensions}.
std::vector<int64_t> band_shape(const ConvGeometry& g, int64_t images, int64_t channels, const Box& box) {
  std::vector<int64_t> shape{images, channels};
  for (int d = kDims - g.spatial_dims; d < kDims; ++d) shape.push_back(box.extent(d));
  return shape;
}

// The first images * C * box.positions() elements of `buffer` as an (images, C, *box extents)
// tensor, contiguous or channels-last.
at::Tensor band_tensor(const at::Tensor& buffer, const ConvGeometry& g, int64_t images, int64_t C, const Box& box,
                       bool channels_last) {
  if (!channels_last) return buffer.view(band_shape(g, images, C, box));
  std::vector<int64_t> shape = band_shape(g, images, 1, box);  // {images, 1, extents}: channels moved last
  shape.erase(shape.begin() + 1);
  shape.push_back(C);
  return buffer.view(shape).movedim(-1, 1);
}

// The masked input of image n over `box` (which may reach past the input: zeros there), written
// to data as C_in * box.positions() elements of acc_t, channels-first or channels-last.
template <typename scalar_t, typename acc_t>
void copy_masked_image(const StridedTensor<const scalar_t>& x, const StridedTensor<const scalar_t>& m,
                       const ConvGeometry& g, int64_t n, const Box& box, const at::TensorOptions& options,
                       bool channels_last, acc_t* data) {
  const int64_t C = g.in_channels;
  const int64_t lines = box.lines(), width = box.extent(2);
  const int64_t w_lo = std::max<int64_t>(box.lo[2], 0), w_hi = std::min(box.hi[2], g.in_size[2]);
  const auto outside = [&](int64_t d, int64_t h) {
    return d < 0 || d >= g.in_size[0] || h < 0 || h >= g.in_size[1] || w_hi <= w_lo;
  };
  // Lines inside the input, of its whole width, whose rows follow each other: copied as one.
  const bool merge = box.lo[2] == 0 && box.hi[2] == g.in_size[2] && rows_follow(x, width) &&
                     rows_follow(m, width);
  if (channels_last) {
    // In pieces of up to `piece` positions (whole lines, several where they merge): each channel's
    // piece is gathered channels-first into `rows` (contiguous reads, vectorised; 2 * C_in streams
    // of a few kB), then written to the band position by position with all its channels
    // (contiguous writes). Rows are piece + 16 elements apart, so that the C_in values of one
    // position fall in different L1 cache sets. (Gathering straight into the interleaved layout
    // read one cache line of each of 2 * C_in planes in turn, planes a power of two apart that
    // evict each other, and wrote each band cache line in 16 pieces: dec1's copy took 40 ms.)
    const int64_t piece = std::clamp<int64_t>((int64_t(1) << 16) / C, 16, 1024), row_stride = piece + 16;
    at::parallel_for(0, lines, grain(width * C), [&](int64_t begin, int64_t end) {
      acc_t* rows = thread_scratch(Scratch::kChannelRows, C * row_stride, options).data_ptr<acc_t>();
      for (int64_t line = begin, run = 1; line < end; line += run) {
        const int64_t d = box.depth(line), h = box.height(line);
        acc_t* dst = data + line * width * C;
        run = 1;
        if (outside(d, h)) {
          std::fill(dst, dst + width * C, acc_t(0));
          continue;
        }
        run = lines_in_run(merge, line, box.extent(1),
                           std::min({end - line, g.in_size[1] - h, std::max<int64_t>(1, piece / width)}));
        const int64_t count = run * (w_hi - w_lo);
        std::fill(dst, dst + (w_lo - box.lo[2]) * C, acc_t(0));
        for (int64_t p0 = 0; p0 < count; p0 += piece) {
          const int64_t n_positions = std::min(piece, count - p0);
          for (int64_t c = 0; c < C; ++c)
            gather_masked_line(x.line(n, c, d, h), x.s[4], mask_line(m, g, n, c, d, h), m.s[4], w_lo + p0, 1,
                               n_positions, rows + c * row_stride);
          transpose_rows_to_positions(rows, row_stride, C, n_positions, dst + (w_lo - box.lo[2] + p0) * C);
        }
        std::fill(dst + (w_lo - box.lo[2] + count) * C, dst + run * width * C, acc_t(0));
      }
    });
    return;
  }
  at::parallel_for(0, C * lines, grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin, run = 1; i < end; i += run) {
      const int64_t c = i / lines, line = i % lines, d = box.depth(line), h = box.height(line);
      acc_t* dst = data + i * width;
      run = 1;
      if (outside(d, h)) {
        std::fill(dst, dst + width, acc_t(0));
        continue;
      }
      run = lines_in_run(merge, line, box.extent(1), std::min(end - i, g.in_size[1] - h));
      std::fill(dst, dst + (w_lo - box.lo[2]), acc_t(0));
      gather_masked_line(x.line(n, c, d, h), x.s[4], mask_line(m, g, n, c, d, h), m.s[4], w_lo, 1,
                         run * (w_hi - w_lo), dst + (w_lo - box.lo[2]));
      std::fill(dst + (w_hi - box.lo[2]), dst + width, acc_t(0));
    }
  });
}

// The masked inputs of images [n, n + images) over `box`, as an (images, C_in, *box extents)
// tensor of acc_t in this thread's masked-band scratch, contiguous or channels-last.
template <typename scalar_t, typename acc_t>
at::Tensor masked_band(const StridedTensor<const scalar_t>& x, const StridedTensor<const scalar_t>& m,
                       const ConvGeometry& g, int64_t n, int64_t images, const Box& box,
                       const at::TensorOptions& options, bool channels_last) {
  const int64_t per_image = g.in_channels * box.positions();
  const at::Tensor buffer = thread_scratch(Scratch::kMaskedBand, images * per_image, options);
  for (int64_t i = 0; i < images; ++i)
    copy_masked_image<scalar_t, acc_t>(x, m, g, n + i, box, options, channels_last,
                                       buffer.data_ptr<acc_t>() + i * per_image);
  return band_tensor(buffer, g, images, g.in_channels, box, channels_last);
}

// Whether X*M is X itself: no mask, or one whose every element is exactly 1 (x * 1 == x for every
// x, infinities and NaN included). The deep layers of an inpainting U-Net see no holes: their
// bands are then the input as it is (input_is_bands) and their input gradient needs no M. A mask
// whose scales show a hole is rejected from them (output positions only); otherwise every
// element is read, stopping at the first other value.
template <typename scalar_t>
bool mask_is_ones(const StridedTensor<const scalar_t>& m, const ConvGeometry& g, const at::Tensor& mask_scales) {
  if (m.data == nullptr) return true;
  if (!scales_of_ones(mask_scales, g)) return false;
  const int64_t images = m.s[0] == 0 ? 1 : g.mask_batch;
  const int64_t channels = g.multi_channel_mask() && m.s[1] != 0 ? g.in_channels : 1;
  const int64_t lines = g.in_size[0] * g.in_size[1], width = g.in_size[2];
  const bool merge = rows_follow(m, width);
  std::atomic<bool> other{false};
  at::parallel_for(0, images * channels * lines, grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin, run = 1; i < end && !other.load(std::memory_order_relaxed); i += run) {
      const int64_t line = i % lines, plane = i / lines;
      run = lines_in_run(merge, line, g.in_size[1], end - i);
      const scalar_t* values = m.line(plane / channels, plane % channels, line / g.in_size[1], line % g.in_size[1]);
      const int64_t count = run * width;
      int64_t others = 0;  // a count rather than a flag: a reduction g++ vectorises
      if (m.s[4] == 1) {
        for (int64_t w = 0; w < count; ++w) others += values[w] != scalar_t(1);
      } else {
        for (int64_t w = 0; w < count; ++w) others += values[w * m.s[4]] != scalar_t(1);
      }
      if (others != 0) other.store(true, std::memory_order_relaxed);
    }
  });
  return !other.load();
}

// Whether the bands are the input itself, convolved as it is: X*M is X (`unmasked`: no mask or a
// mask of ones, mask_is_ones), every image is one band (a band of several images is then a slice
// of the input's batch), no dtype conversion, and the input is laid out as the bands would be.
template <typename scalar_t, typename acc_t>
bool input_is_bands(const at::Tensor& input, bool unmasked, const std::vector<std::vector<Band>>& plans,
                    const ConvGeometry& g, bool channels_last) {
  if (!std::is_same_v<scalar_t, acc_t> || !unmasked) return false;
  for (const std::vector<Band>& plan : plans)
    if (!whole_image(plan, g)) return false;
  const at::MemoryFormat layout = !channels_last       ? at::MemoryFormat::Contiguous
                                  : input.dim() == 5   ? at::MemoryFormat::ChannelsLast3d
                                                       : at::MemoryFormat::ChannelsLast;
  return input.is_contiguous(layout);
}

// What the bands are made from: the mask as they read it (none where X*M is X: M is then never
// read) and whether they are the input itself. One decision for forward, backward and forward_path.
template <typename scalar_t>
struct BandSource {
  StridedTensor<const scalar_t> mask;
  bool unmasked, input_itself;
};

template <typename scalar_t, typename acc_t>
BandSource<scalar_t> band_source(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& mask_scales,
                                 const std::vector<std::vector<Band>>& plans, const ConvGeometry& g,
                                 bool channels_last) {
  const StridedTensor<const scalar_t> given(mask);
  const bool unmasked = mask_is_ones(given, g, mask_scales);
  return {unmasked ? StridedTensor<const scalar_t>() : given, unmasked,
          input_is_bands<scalar_t, acc_t>(input, unmasked, plans, g, channels_last)};
}

// The input box a band reads, and the convolution's padding for it (the band's shared padding
// along the band axis, the layer's along the others).
struct BandInput {
  Box box;
  std::vector<int64_t> padding;
};

BandInput band_input(const ConvGeometry& g, const Band& band) {
  const int a = band_axis(g);
  const RowSpan rows = input_rows(g, band.begin, band.end);
  BandInput input{band_box(g, g.in_size, rows.first, rows.first + rows.count), {}};
  for (int d = a; d < kDims; ++d) input.padding.push_back(d == a ? rows.pad : g.pad[d]);
  return input;
}

std::vector<int64_t> real_dims(const ConvGeometry& g, const int64_t (&values)[kDims]) {
  return spatial_sizes(values, g.spatial_dims);
}

// Writes zeros to the output positions of the band-axis indices no band covers.
template <typename scalar_t>
void zero_uncovered(const StridedTensor<scalar_t>& out, const ConvGeometry& g, int64_t n,
                    const std::vector<Band>& bands) {
  const int a = band_axis(g);
  std::vector<char> covered(size_t(g.out_size[a]), 0);
  for (const Band& band : bands) std::fill(covered.begin() + band.begin, covered.begin() + band.end, 1);
  at::parallel_for(0, g.out_channels, grain(g.out_positions()), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      for (int64_t o = 0; o < g.out_size[a]; ++o) {
        if (covered[size_t(o)]) continue;
        const Box box = band_box(g, g.out_size, o, o + 1);
        for (int64_t line = 0; line < box.lines(); ++line) {
          scalar_t* dst = out.line(n, c, box.depth(line), box.height(line));
          for (int64_t w = box.lo[2]; w < box.hi[2]; ++w) dst[w * out.s[4]] = scalar_t(0);
        }
      }
  });
}

// Offset of the first position of line `line` of an output box in the raster order of the
// mask scales.
int64_t scales_offset(const ConvGeometry& g, const Box& box, int64_t line) {
  return (box.depth(line) * g.out_size[1] + box.height(line)) * g.out_size[2] + box.lo[2];
}

// grad_input of image n = M * grad (d(X*M)/dX = M; a hole gets exactly 0), from the image's
// gradient `grad` laid out channels-last (each position's C_in values together, as oneDNN's data
// gradient comes), into gin's layout. A line of positions at a time: its width * C_in values are
// transposed into per-channel rows in this thread's scratch (a few tens of kB, in cache), then
// each channel's row is multiplied by M and written out.
template <typename scalar_t, typename acc_t>
void write_masked_grad_input_from_positions(const acc_t* grad, const StridedTensor<const scalar_t>& m,
                                            const StridedTensor<scalar_t>& gin, const ConvGeometry& g,
                                            int64_t n, const at::TensorOptions& options) {
  const int64_t C = g.in_channels, lines = g.in_size[0] * g.in_size[1], width = g.in_size[2];
  at::parallel_for(0, lines, grain(width * C), [&](int64_t begin, int64_t end) {
    acc_t* rows = thread_scratch(Scratch::kChannelRows, C * width, options).data_ptr<acc_t>();
    for (int64_t line = begin; line < end; ++line) {
      const int64_t d = line / g.in_size[1], h = line % g.in_size[1];
      // rows[c * width + w] = grad[(line * width + w) * C + c]: the (width x C) block transposed.
      transpose_rows_to_positions(grad + line * width * C, C, width, C, rows);
      for (int64_t c = 0; c < C; ++c)
        write_masked_line(rows + c * width, mask_line(m, g, n, c, d, h), m.s[4], gin.line(n, c, d, h), gin.s[4],
                          width);
    }
  });
}

}  // namespace

// oneDNN (torch 2.14's, AVX2) convolves a float32 input faster channels-last than channels-first
// when the layer has few output channels and enough input channels. Inside our forward of
// PConvUNet's dec1 (67->3 3x3 at 256x256; two runs, 2 threads, the benchmark's malloc setting) the
// convolution took 6.6-7.3 ms instead of 11.9-12.8 and the whole forward 15.2-15.4 instead of
// 17.7-19.5 (the transposing copy costs 3-4 ms more than the channels-first one). Plain F.conv2d
// in a fresh process: 67->16 14.3 -> 8.2 ms, 67->32 22 -> 17 ms; a wash or slower with many output
// channels (enc2, 64->128 5x5/2: 1.3x slower; dec3 384->128: 0.95x) or few input channels (enc1,
// 3->64 7x7/2: 1.24x slower), 2x slower in 1-D; in 3-D a win only from 64 input channels (67->3
// 3x3x3 at 8x64x64: 15 -> 10 ms; 35->3 and 16->3 slower). Backward stays channels-first: its
// weight gradient is 1.3-3x slower channels-last, and splitting the two gradients by layout
// gained nothing inside a training step. (After a channels-last forward, oneDNN's channels-first
// backward of dec1 took 18-21 ms instead of 14-18: dec1's forward + backward came out about even,
// 45.3-47.3 ms against 47.7-52.7.) See bench/NOTES.md.
bool channels_last_bands(const ConvGeometry& g, at::ScalarType band_dtype) {
  const int64_t fewest_in_channels = g.spatial_dims == 2 ? 16 : 64;
  return band_dtype == at::kFloat && g.groups == 1 && g.spatial_dims >= 2 && g.taps() > 1 &&
         g.out_channels <= 32 && g.in_channels >= fewest_in_channels;
}

// Whether backward asks oneDNN for grad_input channels-last, in a call of its own (grad_weight
// stays channels-first: 1.3-3x slower channels-last). For a strided convolution oneDNN's data
// gradient (its brgemm strided kernel, on this AVX2 CPU) comes channels-last either way; asked
// channels-first, ATen turns it channels-first with a generic strided copy (1.5 ms of enc3's 24
// ms backward; stride-1 layers get it channels-first, no copy). Asked channels-last, the copy is
// our M pass's, which transposes as it multiplies (write_masked_grad_input_from_positions). That
// call also needs the weight channels-last (one more copy of it) and grad_output channels-last: it
// pays where grad_input is large beside the weight (PConvUNet's enc2 and enc3 forward + backward
// 2-3% faster; enc4-enc6, whose weights are 4-30x their inputs, lose; bench/NOTES.md), and only
// where ATen gives the convolution to oneDNN at all.
bool channels_last_input_gradient(const ConvGeometry& g, at::ScalarType band_dtype) {
  const bool strided = g.stride[1] > 1 || g.stride[2] > 1;
  return band_dtype == at::kFloat && g.groups == 1 && g.spatial_dims == 2 && g.taps() > 1 && strided &&
         2 * g.in_positions() >= g.out_channels * g.taps() && aten_convolves_through_onednn(g);
}

bool dense_forward_reads_input(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& mask_scales,
                               const ConvGeometry& g) {
  bool reads = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dense_forward_reads_input", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    reads = band_source<scalar_t, acc_t>(input, mask, mask_scales, plan_all_bands<acc_t>(mask_scales, g), g,
                                         channels_last_bands(g, mask_scales.scalar_type()))
                .input_itself;
  });
  return reads;
}

template <typename scalar_t>
void forward_bands(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& weight,
                   const at::Tensor& bias, const ForwardProblem& problem, at::Tensor& output,
                   const at::Tensor& mask_scales) {
  using acc_t = at::opmath_type<scalar_t>;
  const ConvGeometry& g = problem.geometry;
  const at::TensorOptions options = acc_options(input);
  const at::Tensor w = weight.to(options.dtype()).contiguous();
  const at::Tensor b = bias.defined() ? bias.to(options.dtype()).contiguous() : at::Tensor();
  const acc_t* bias_data = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
  const StridedTensor<const scalar_t> x(input);
  const StridedTensor<scalar_t> out(output);
  const acc_t slope = acc_t(problem.negative_slope);
  const std::vector<int64_t> stride = real_dims(g, g.stride), dilation = real_dims(g, g.dilation);
  const std::vector<int64_t> no_output_padding(size_t(g.spatial_dims), 0);

  const bool channels_last = channels_last_bands(g, options.dtype().toScalarType());
  const std::vector<std::vector<Band>> plans = plan_all_bands<acc_t>(mask_scales, g);
  const BandSource<scalar_t> source = band_source<scalar_t, acc_t>(input, mask, mask_scales, plans, g, channels_last);
  const StridedTensor<const scalar_t>& m = source.mask;
  for (int64_t n = 0, images = 1; n < g.batch; n += images) {
    const std::vector<Band>& bands = plans[size_t(g.mask_batch == 1 ? 0 : n)];
    images = images_in_band(plans, g, n);
    for (const Band& band : bands) {
      const BandInput in = band_input(g, band);
      const at::Tensor band_in = source.input_itself
                                     ? input.narrow(0, n, images)
                                     : masked_band<scalar_t, acc_t>(x, m, g, n, images, in.box, options, channels_last);
      at::Tensor conv = at::convolution(band_in, w, {}, stride, in.padding, dilation, false, no_output_padding,
                                        g.groups);
      // One band that is the whole batch's output, in the output's dtype and layout: the epilogue
      // runs in place and the convolution's result becomes the output (no second output-sized tensor).
      const bool whole_output = std::is_same_v<scalar_t, acc_t> && images == g.batch && whole_image(bands, g) &&
                                conv.sizes() == output.sizes() && conv.strides() == output.strides();
      if (whole_output) output = conv;
      const StridedTensor<scalar_t> dst_view = whole_output ? StridedTensor<scalar_t>(conv) : out;
      const StridedTensor<const acc_t> conv_view(conv);
      const Box box = band_box(g, g.out_size, band.begin, band.end);  // of the whole width
      const int64_t lines = box.lines(), width = box.extent(2);
      for (int64_t i = 0; i < images; ++i) {
        const ImageScales<acc_t> scales = image_scales<acc_t>(mask_scales, g, g.mask_batch == 1 ? 0 : n + i);
        // The `count` positions from line `line` of the band, output channel c, of image n + i.
        const auto write = [&](int64_t c, int64_t line, int64_t count) {
          const int64_t p0 = scales_offset(g, box, line);
          const acc_t bias_c = bias_data ? bias_data[c] : acc_t(0);
          scalar_t* dst = dst_view.line(n + i, c, box.depth(line), box.height(line)) + box.lo[2] * dst_view.s[4];
          with_activation(problem.activation, [&](auto act) {
            write_output_line<decltype(act)::value>(
                conv_view.line(i, c, line / box.extent(1), line % box.extent(1)), conv_view.s[4], scales.ratio + p0,
                scales.update + p0, bias_c, slope, dst, dst_view.s[4], count);
          });
        };
        if (conv_view.s[1] == 1 && g.out_channels > 1) {
          // Channels-last result: a line at a time with its channels inside (each cache line read once).
          at::parallel_for(0, lines, grain(width * g.out_channels), [&](int64_t begin, int64_t end) {
            for (int64_t line = begin; line < end; ++line)
              for (int64_t c = 0; c < g.out_channels; ++c) write(c, line, width);
          });
        } else {
          const bool merge = rows_follow(dst_view, width) && rows_follow(conv_view, width);
          at::parallel_for(0, g.out_channels * lines, grain(width), [&](int64_t begin, int64_t end) {
            for (int64_t j = begin, run = 1; j < end; j += run) {
              run = lines_in_run(merge, j % lines, box.extent(1), end - j);
              write(j / lines, j % lines, run * width);
            }
          });
        }
      }
    }
    for (int64_t i = 0; i < images; ++i) zero_uncovered(out, g, n + i, bands);
  }
}

template <typename scalar_t>
void backward_bands(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mask,
                    const at::Tensor& weight, const at::Tensor& output,
                    const at::Tensor& mask_scales, const ForwardProblem& problem,
                    std::array<bool, 3> output_mask, at::Tensor& grad_input,
                    at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const ConvGeometry& g = problem.geometry;
  const auto [need_input, need_weight, need_bias] = output_mask;
  const int a = band_axis(g);
  const at::TensorOptions options = acc_options(input);
  const at::ScalarType band_dtype = options.dtype().toScalarType();
  const at::Tensor w = weight.to(options.dtype()).contiguous();
  // The bands' weight gradients summed: the first band's own tensor, the later ones added to it
  // (no zero-filled accumulator: the deep layers' weights are megabytes and their images tiny).
  at::Tensor grad_weight_sum;
  at::Tensor grad_bias_acc = at::zeros({g.out_channels}, options);
  // grad_input of one image before the multiplication by M: (C_in, *spatial), made when a band
  // does not cover the whole image (otherwise the band's own gradient is that).
  std::vector<int64_t> image_shape{g.in_channels};
  for (const int64_t s : real_dims(g, g.in_size)) image_shape.push_back(s);
  at::Tensor grad_image;
  const std::vector<std::vector<Band>> plans = plan_all_bands<acc_t>(mask_scales, g);
  const StridedTensor<const scalar_t> x(input), gout(grad_output), z(output);
  const BandSource<scalar_t> source =
      band_source<scalar_t, acc_t>(input, mask, mask_scales, plans, g, /*channels_last=*/false);
  const StridedTensor<const scalar_t>& m = source.mask;
  // grad_input and grad_weight come undefined and are made here where the convolution's own
  // gradients cannot be handed over (a deep layer's weight gradient is megabytes: with a second one
  // allocated beforehand only to be dropped, enc6's convolution_backward took 0.5 ms more a call).
  const auto input_gradient = [&] {
    if (!grad_input.defined())
      grad_input = at::empty(input.sizes(), input.options().memory_format(output_memory_format(input)));
    return StridedTensor<scalar_t>(grad_input);
  };
  acc_t* grad_bias_data = grad_bias_acc.data_ptr<acc_t>();
  const acc_t slope = acc_t(problem.negative_slope);
  const std::vector<int64_t> stride = real_dims(g, g.stride), dilation = real_dims(g, g.dilation);
  const std::vector<int64_t> no_output_padding(size_t(g.spatial_dims), 0);

  for (int64_t n = 0, images = 1; n < g.batch; n += images) {
    // Slabs of holes have a zero gradient scale: skipped as in forward, and the same images
    // convolved together.
    const std::vector<Band>& bands = plans[size_t(g.mask_batch == 1 ? 0 : n)];
    images = images_in_band(plans, g, n);
    bool written_directly = false;
    for (const Band& band : bands) {
      const Box box = band_box(g, g.out_size, band.begin, band.end);  // of the whole width
      const int64_t lines = box.lines(), width = box.extent(2);
      const bool merge = rows_follow(gout, width) && rows_follow(z, width);
      const int64_t per_image = g.out_channels * box.positions();
      at::Tensor grad_conv = thread_scratch(Scratch::kGradConv, images * per_image, options)
                                 .view(band_shape(g, images, g.out_channels, box));
      acc_t* grad_conv_data = grad_conv.data_ptr<acc_t>();
      // Each output channel is owned by one thread (all images of the band): its bias sum needs
      // no atomics.
      at::parallel_for(0, g.out_channels, grain(images * box.positions()), [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          acc_t bias_sum = acc_t(0);
          for (int64_t i = 0; i < images; ++i) {
            const ImageScales<acc_t> scales = image_scales<acc_t>(mask_scales, g, g.mask_batch == 1 ? 0 : n + i);
            for (int64_t line = 0, run = 1; line < lines; line += run) {
              run = lines_in_run(merge, line, box.extent(1), lines - line);
              const int64_t d = box.depth(line), h = box.height(line), p0 = scales_offset(g, box, line);
              with_activation(problem.activation, [&](auto act) {
                bias_sum += scale_output_grad_line<decltype(act)::value>(
                    gout.line(n + i, c, d, h) + box.lo[2] * gout.s[4], gout.s[4],
                    z.data ? z.line(n + i, c, d, h) + box.lo[2] * z.s[4] : nullptr, z.s[4],
                    scales.ratio + p0, scales.update + p0, slope,
                    grad_conv_data + i * per_image + (c * lines + line) * width, run * width);
              });
            }
          }
          grad_bias_data[c] += bias_sum;
        }
      });
      if (!need_input && !need_weight) continue;
      const BandInput in = band_input(g, band);
      const bool whole_images = bands.size() == 1 && in.box.lo[a] == 0 && in.box.hi[a] == g.in_size[a];
      const bool input_gradient_channels_last = need_input && whole_images && channels_last_input_gradient(g, band_dtype);
      // The band's masked input feeds grad_weight; grad_input only needs its shape.
      const at::Tensor band_in =
          source.input_itself ? input.narrow(0, n, images)
          : need_weight ? masked_band<scalar_t, acc_t>(x, m, g, n, images, in.box, options, /*channels_last=*/false)
                        : band_tensor(thread_scratch(Scratch::kMaskedBand, images * g.in_channels * in.box.positions(),
                                                     options),
                                      g, images, g.in_channels, in.box, /*channels_last=*/input_gradient_channels_last);
      const auto [band_grad_input_first, band_grad_weight, unused] = at::convolution_backward(
          grad_conv, band_in, w, std::nullopt, stride, in.padding, dilation, false,
          no_output_padding, g.groups, {need_input && !input_gradient_channels_last, need_weight, false});
      at::Tensor band_grad_input = band_grad_input_first;
      if (input_gradient_channels_last) {
        // grad_output (scaled) and the weight channels-last; the input only lends its shape.
        const at::Tensor grad_conv_last = band_tensor(
            thread_scratch(Scratch::kGradConvChannelsLast, images * per_image, options), g, images,
            g.out_channels, box, /*channels_last=*/true);
        acc_t* grad_conv_last_data = grad_conv_last.data_ptr<acc_t>();
        const int64_t positions = box.positions();
        at::parallel_for(0, images * positions, grain(g.out_channels), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin / positions; i * positions < end; ++i) {
            const int64_t p0 = std::max(begin - i * positions, int64_t(0));
            const int64_t p1 = std::min(end - i * positions, positions);
            transpose_rows_to_positions(grad_conv_data + i * per_image + p0, positions, g.out_channels, p1 - p0,
                                        grad_conv_last_data + i * per_image + p0 * g.out_channels);
          }
        });
        const at::Tensor shape_only =
            band_in.is_contiguous(at::MemoryFormat::ChannelsLast)
                ? band_in
                : at::empty(band_in.sizes(), options.memory_format(at::MemoryFormat::ChannelsLast));
        band_grad_input = std::get<0>(at::convolution_backward(
            grad_conv_last, shape_only, w.contiguous(at::MemoryFormat::ChannelsLast), std::nullopt, stride,
            in.padding, dilation, false, no_output_padding, g.groups, {true, false, false}));
      }
      if (need_weight) {
        if (grad_weight_sum.defined())
          grad_weight_sum.add_(band_grad_weight);
        else
          grad_weight_sum = band_grad_weight;
      }
      if (need_input) {
        if (input_gradient_channels_last && band_grad_input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
          written_directly = true;
          const StridedTensor<scalar_t> destination = input_gradient();
          for (int64_t i = 0; i < images; ++i)
            write_masked_grad_input_from_positions(band_grad_input.data_ptr<acc_t>() + i * g.in_channels * g.in_positions(),
                                                   m, destination, g, n + i, options);
          continue;
        }
        if (whole_images && band_grad_input.is_contiguous()) {
          // One band over whole images: its gradient is theirs; M applied, written directly. Where
          // the band is the whole batch in grad_input's dtype and layout, M is applied in place
          // (not at all where M is ones) and the band's gradient becomes grad_input.
          written_directly = true;
          const bool in_place = std::is_same_v<scalar_t, acc_t> && images == g.batch &&
                                band_grad_input.sizes() == input.sizes() &&
                                band_grad_input.is_contiguous(output_memory_format(input));
          const StridedTensor<scalar_t> destination =
              in_place ? StridedTensor<scalar_t>(band_grad_input) : input_gradient();
          if (!in_place || !source.unmasked)
            for (int64_t i = 0; i < images; ++i)
              write_masked_grad_input(band_grad_input.data_ptr<acc_t>() + i * g.in_channels * g.in_positions(), m,
                                      destination, g, n + i, /*clear=*/false);
          if (in_place) grad_input = band_grad_input;
          continue;
        }
        // (images is 1: only whole-image plans are convolved together.)
        if (!grad_image.defined()) grad_image = at::zeros(image_shape, options);
        // Add the band's input indices that lie inside the input.
        const int64_t first = std::max<int64_t>(in.box.lo[a], 0);
        const int64_t last = std::min(in.box.hi[a], g.in_size[a]);
        if (last > first)
          grad_image.narrow(1, first, last - first)
              .add_(band_grad_input[0].narrow(1, first - in.box.lo[a], last - first));
      }
    }
    if (need_input && !written_directly) {
      if (!grad_image.defined()) grad_image = at::zeros(image_shape, options);  // no band: all holes
      write_masked_grad_input(grad_image.data_ptr<acc_t>(), m, input_gradient(), g, n);
    }
  }
  if (need_input) input_gradient();  // made, if an empty batch wrote none
  if (need_weight) {
    if (!grad_weight_sum.defined())  // no band: every output position is a hole
      grad_weight = at::zeros(weight.sizes(), weight.options());
    else if (grad_weight_sum.scalar_type() == weight.scalar_type() && grad_weight_sum.is_contiguous())
      grad_weight = grad_weight_sum;  // hand the sum over instead of copying it
    else
      grad_weight = grad_weight_sum.to(weight.scalar_type()).contiguous();
  }
  if (need_bias) grad_bias.copy_(grad_bias_acc);
}

PCONV_INSTANTIATE_FOR_DTYPES(forward_bands,
                             (const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const ForwardProblem&, at::Tensor&,
                              const at::Tensor&))
PCONV_INSTANTIATE_FOR_DTYPES(backward_bands,
                             (const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const ForwardProblem&, std::array<bool, 3>, at::Tensor&,
                              at::Tensor&, at::Tensor&))

}  // namespace cpu
}  // namespace partialconv

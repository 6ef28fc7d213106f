// 2D convolution forward, backward-data and backward-weights on the CPU with oneDNN 3, as XLA
// FFI custom calls. The interface is XLA's: activations NHWC, kernels HWIO, float32, and an
// optional bias (a zero-length buffer means none): the forward pass adds it, the
// backward-weights pass sums its gradient, both inside oneDNN's kernels. oneDNN runs NHWC
// activations as they are (brgconv/jit kernels) and may want the kernel in a blocked layout,
// which a reorder into a scratch buffer gives it.
//
// Threads: each call splits the batch into one chunk per thread of XLA's intra-op pool and
// runs every chunk with single-threaded oneDNN (no OpenMP team competing with XLA's threads).
// Primitives and scratch buffers are built once per chunk shape and thread.

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;
using Dims = dnnl::memory::dims;

extern "C" void omp_set_num_threads(int);

namespace {

// N, C, H, W, O, KH, KW, stride h/w, pad low h/w, pad high h/w, dilation h/w (1 = none).
using Geometry = std::array<int64_t, 15>;
enum Kind { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A user buffer (plain layout) and, when the primitive wants another layout, a scratch buffer
// in that layout with the reorders between them.
struct Operand {
  int arg;
  memory::desc plain, want;
  memory scratch;
  dnnl::reorder to_want, to_plain;

  Operand(int arg_id, const memory::desc& plain_desc, const memory::desc& wanted)
      : arg(arg_id), plain(plain_desc), want(wanted) {
    if (want == plain) return;
    scratch = memory(want, Engine());
    to_want = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), plain, Engine(), want));
    to_plain = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), want, Engine(), plain));
  }
  // An input: `data` as the primitive reads it (reordered into the scratch buffer if need be).
  memory In(void* data, dnnl::stream& s) const {
    memory user(plain, Engine(), data);
    if (want == plain) return user;
    to_want.execute(s, {{DNNL_ARG_FROM, user}, {DNNL_ARG_TO, scratch}});
    return scratch;
  }
  // An output: the memory the primitive writes, the user buffer or the scratch buffer.
  memory Out(void* data) const { return want == plain ? memory(plain, Engine(), data) : scratch; }
  // After the primitive: the scratch result into the user buffer, when they differ.
  void Finish(void* data, dnnl::stream& s) const {
    if (want == plain) return;
    to_plain.execute(s, {{DNNL_ARG_FROM, scratch}, {DNNL_ARG_TO, memory(plain, Engine(), data)}});
  }
};

// One pass of one chunk shape: its primitive, inputs and outputs, in the order of the call's
// buffers. Backward primitives keep a pointer to the forward descriptor, so it lives here too.
struct Pass {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::primitive prim;
  std::vector<Operand> in, out;

  void Run(const std::vector<void*>& in_data, const std::vector<void*>& out_data) {
    thread_local dnnl::stream s(Engine());
    std::unordered_map<int, memory> args;
    for (size_t i = 0; i < in.size(); ++i) args[in[i].arg] = in[i].In(in_data[i], s);
    for (size_t i = 0; i < out.size(); ++i) args[out[i].arg] = out[i].Out(out_data[i]);
    prim.execute(s, args);
    for (size_t i = 0; i < out.size(); ++i) out[i].Finish(out_data[i], s);
    s.wait();
  }
};

std::unique_ptr<Pass> MakePass(const Geometry& g, Kind kind, bool bias) {
  const int64_t n = g[0], c = g[1], h = g[2], w = g[3], o = g[4], kh = g[5], kw = g[6];
  const int64_t oh = (h + g[9] + g[11] - (g[13] * (kh - 1) + 1)) / g[7] + 1;
  const int64_t ow = (w + g[10] + g[12] - (g[14] * (kw - 1) + 1)) / g[8] + 1;
  const Dims strides{g[7], g[8]}, pad_l{g[9], g[10]}, pad_r{g[11], g[12]};
  const Dims dilation{g[13] - 1, g[14] - 1};
  const auto f32 = memory::data_type::f32;
  const memory::desc src({n, c, h, w}, f32, Tag::nhwc), dst({n, o, oh, ow}, f32, Tag::nhwc);
  const memory::desc wei({o, c, kh, kw}, f32, Tag::hwio), wei_any({o, c, kh, kw}, f32, Tag::any);
  const memory::desc bia = bias ? memory::desc({o}, f32, Tag::a) : memory::desc();
  const auto direct = dnnl::algorithm::convolution_direct;

  auto pass = std::make_unique<Pass>();
  pass->fwd_pd = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, direct, src, wei_any, bia, dst, strides,
      dilation, pad_l, pad_r);
  const auto& fwd = pass->fwd_pd;
  auto& in = pass->in;
  auto& out = pass->out;
  if (kind == kForward) {  // (x, w[, b]) -> y
    pass->prim = dnnl::convolution_forward(fwd);
    in = {{DNNL_ARG_SRC, src, fwd.src_desc()}, {DNNL_ARG_WEIGHTS, wei, fwd.weights_desc()}};
    if (bias) in.emplace_back(DNNL_ARG_BIAS, bia, bia);
    out = {{DNNL_ARG_DST, dst, fwd.dst_desc()}};
  } else if (kind == kBackwardData) {  // (dy, w) -> dx
    dnnl::convolution_backward_data::primitive_desc pd(Engine(), direct, src, wei_any, dst,
                                                       strides, dilation, pad_l, pad_r, fwd);
    pass->prim = dnnl::convolution_backward_data(pd);
    in = {{DNNL_ARG_DIFF_DST, dst, pd.diff_dst_desc()}, {DNNL_ARG_WEIGHTS, wei, pd.weights_desc()}};
    out = {{DNNL_ARG_DIFF_SRC, src, pd.diff_src_desc()}};
  } else {  // (x, dy) -> dw[, db]
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), direct, src, wei_any, bia, dst, strides, dilation, pad_l, pad_r, fwd);
    pass->prim = dnnl::convolution_backward_weights(pd);
    in = {{DNNL_ARG_SRC, src, pd.src_desc()}, {DNNL_ARG_DIFF_DST, dst, pd.diff_dst_desc()}};
    out = {{DNNL_ARG_DIFF_WEIGHTS, wei, pd.diff_weights_desc()}};
    if (bias) out.emplace_back(DNNL_ARG_DIFF_BIAS, bia, bia);
  }
  return pass;
}

// Chunks of the batch, claimed by the calling thread and by tasks on XLA's thread pool, so a
// caller never waits on a chunk that nobody runs. Late tasks find nothing left and return.
struct Job {
  std::atomic<int> next{0}, done{0};
  std::mutex mu;
  std::string error;
};

// Forward (x, w, b) -> y; backward-data (dy, w) -> dx; backward-weights (x, dy) -> (dw, db).
// A zero-length b or db: no bias. Backward-weights chunks write partial gradients, summed here.
ffi::Error Execute(Kind kind, ffi::ThreadPool pool, std::vector<ffi::AnyBuffer> in,
                   std::vector<ffi::AnyBuffer*> out, ffi::Span<const int64_t> geometry) {
  if (geometry.size() != std::tuple_size<Geometry>::value) {
    return ffi::Error::InvalidArgument("onednn conv: geometry needs 15 integers");
  }
  Geometry g;
  std::copy(geometry.begin(), geometry.end(), g.begin());
  const bool bias = kind == kForward    ? in[2].element_count() > 0
                    : kind == kBackwardWeights ? out[1]->element_count() > 0
                                               : false;
  if (!bias && kind == kForward) in.pop_back();
  if (!bias && kind == kBackwardWeights) out.pop_back();

  const int64_t n = g[0];
  const int chunks = static_cast<int>(std::max<int64_t>(1, std::min(n, pool.num_threads())));
  // Per-example floats of the batched buffers (0: shared by all chunks, not split).
  auto per_example = [n](const ffi::AnyBuffer& b, bool batched) {
    return batched ? static_cast<int64_t>(b.element_count()) / n : 0;
  };
  std::vector<int64_t> in_step, out_step;
  for (size_t i = 0; i < in.size(); ++i) {
    const bool batched = kind == kBackwardWeights ? i < 2 : i == 0;
    in_step.push_back(per_example(in[i], batched));
  }
  for (auto* b : out) out_step.push_back(per_example(*b, kind != kBackwardWeights));
  std::vector<std::vector<std::vector<float>>> partial(kind == kBackwardWeights ? chunks : 0);

  auto run = [&](int i) {
    const int64_t lo = n * i / chunks, hi = n * (i + 1) / chunks;
    Geometry part = g;
    part[0] = hi - lo;
    thread_local std::map<std::tuple<Geometry, int, bool>, std::unique_ptr<Pass>> passes;
    auto& pass = passes[{part, kind, bias}];
    if (!pass) pass = MakePass(part, kind, bias);
    std::vector<void*> in_data, out_data;
    for (size_t k = 0; k < in.size(); ++k) {
      in_data.push_back(static_cast<float*>(in[k].untyped_data()) + lo * in_step[k]);
    }
    for (size_t k = 0; k < out.size(); ++k) {
      if (kind == kBackwardWeights) {
        partial[i].emplace_back(out[k]->element_count());
        out_data.push_back(partial[i].back().data());
      } else {
        out_data.push_back(static_cast<float*>(out[k]->untyped_data()) + lo * out_step[k]);
      }
    }
    pass->Run(in_data, out_data);
  };
  auto job = std::make_shared<Job>();
  auto work = [job, chunks, &run] {
    omp_set_num_threads(1);
    for (int i; (i = job->next.fetch_add(1)) < chunks;) {
      try {
        run(i);
      } catch (const dnnl::error& e) {
        std::lock_guard<std::mutex> lock(job->mu);
        job->error = e.what();
      }
      job->done.fetch_add(1, std::memory_order_release);
    }
  };
  // Tasks may start after this call returns: they hold the job and then never touch `run`.
  for (int t = 1; t < chunks; ++t) {
    pool.Schedule([job, chunks, work] {
      if (job->next.load() < chunks) work();
    });
  }
  work();
  while (job->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
  if (!job->error.empty()) {
    return ffi::Error::Internal("oneDNN convolution failed: " + job->error);
  }
  for (size_t o = 0; o < out.size() && !partial.empty(); ++o) {
    auto* dst = static_cast<float*>(out[o]->untyped_data());
    std::copy(partial[0][o].begin(), partial[0][o].end(), dst);
    for (int i = 1; i < chunks; ++i) {
      for (size_t e = 0; e < partial[i][o].size(); ++e) dst[e] += partial[i][o][e];
    }
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer b,
                   ffi::Result<ffi::AnyBuffer> y, ffi::Span<const int64_t> geometry) {
  return Execute(kForward, pool, {x, w, b}, {&*y}, geometry);
}

ffi::Error BackwardData(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer w,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Span<const int64_t> geometry) {
  return Execute(kBackwardData, pool, {dy, w}, {&*dx}, geometry);
}

ffi::Error BackwardWeights(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                           ffi::Result<ffi::AnyBuffer> dw, ffi::Result<ffi::AnyBuffer> db,
                           ffi::Span<const int64_t> geometry) {
  return Execute(kBackwardWeights, pool, {x, dy}, {&*dw, &*db}, geometry);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnjax_conv_forward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("geometry"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnjax_conv_backward_data, BackwardData,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("geometry"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnjax_conv_backward_weights, BackwardWeights,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("geometry"));

// 2D convolution forward, backward-data and backward-weights on the CPU with oneDNN 3, as XLA
// FFI custom calls. The interface is XLA's: activations NHWC, kernels HWIO, float32. oneDNN
// runs NHWC activations as they are (its brgconv/jit kernels) and may want the kernel in a
// blocked layout, which a reorder into a scratch buffer gives it. Primitives and scratch
// buffers are built once per shape and thread.

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;
using Dims = dnnl::memory::dims;

namespace {

// N, C, H, W, O, KH, KW, stride h/w, pad low h/w, pad high h/w, dilation h/w (1 = none).
using Geometry = std::array<int64_t, 15>;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A user buffer (plain layout) and, when the primitive wants another layout, a scratch buffer
// in that layout with the reorder between them.
struct Operand {
  memory::desc plain;
  memory::desc want;
  memory scratch;
  dnnl::reorder to_want, to_plain;

  Operand(const memory::desc& plain_desc, const memory::desc& wanted)
      : plain(plain_desc), want(wanted) {
    if (want == plain) return;
    scratch = memory(want, Engine());
    to_want = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), plain, Engine(), want));
    to_plain = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), want, Engine(), plain));
  }
  // Reorders `data` in and returns the memory the primitive reads.
  memory In(void* data, dnnl::stream& s) const {
    memory user(plain, Engine(), data);
    if (want == plain) return user;
    to_want.execute(s, {{DNNL_ARG_FROM, user}, {DNNL_ARG_TO, scratch}});
    return scratch;
  }
  // The memory the primitive writes: the user buffer itself or the scratch buffer.
  memory Out(void* data) const {
    return want == plain ? memory(plain, Engine(), data) : scratch;
  }
  // Copies the scratch result back into the user buffer when they differ.
  void Finish(void* data, dnnl::stream& s) const {
    if (want == plain) return;
    to_plain.execute(s, {{DNNL_ARG_FROM, scratch}, {DNNL_ARG_TO, memory(plain, Engine(), data)}});
  }
};

struct Conv {
  Dims strides, pad_l, pad_r, dilation;
  memory::desc src, wei, dst;  // plain: NHWC, HWIO, NHWC
  memory::desc wei_any;  // the kernel layout is oneDNN's choice
  dnnl::convolution_forward::primitive_desc fwd_pd;

  explicit Conv(const Geometry& g)
      : strides{g[7], g[8]},
        pad_l{g[9], g[10]},
        pad_r{g[11], g[12]},
        dilation{g[13] - 1, g[14] - 1} {
    const int64_t n = g[0], c = g[1], h = g[2], w = g[3], o = g[4], kh = g[5], kw = g[6];
    const int64_t oh = (h + g[9] + g[11] - (g[13] * (kh - 1) + 1)) / g[7] + 1;
    const int64_t ow = (w + g[10] + g[12] - (g[14] * (kw - 1) + 1)) / g[8] + 1;
    const auto f32 = memory::data_type::f32;
    src = memory::desc({n, c, h, w}, f32, Tag::nhwc);
    wei = memory::desc({o, c, kh, kw}, f32, Tag::hwio);
    dst = memory::desc({n, o, oh, ow}, f32, Tag::nhwc);
    wei_any = memory::desc(wei.get_dims(), f32, Tag::any);
    fwd_pd = dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src,
        wei_any, dst, strides, dilation, pad_l, pad_r);
  }
};

// One pass (forward, backward-data or backward-weights): its primitive and its three operands.
struct Pass {
  std::unique_ptr<Conv> conv;  // backward primitives keep a pointer to its forward descriptor
  dnnl::primitive prim;
  std::unique_ptr<Operand> a, b, out;  // two inputs, one output
  int arg_a, arg_b, arg_out;

  void Run(void* a_data, void* b_data, void* out_data) {
    thread_local dnnl::stream s(Engine());
    memory ma = a->In(a_data, s), mb = b->In(b_data, s), mo = out->Out(out_data);
    prim.execute(s, {{arg_a, ma}, {arg_b, mb}, {arg_out, mo}});
    out->Finish(out_data, s);
    s.wait();
  }
};

enum Kind { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

std::unique_ptr<Pass> MakePass(const Geometry& g, Kind kind) {
  auto pass = std::make_unique<Pass>();
  pass->conv = std::make_unique<Conv>(g);
  const Conv& c = *pass->conv;
  auto op = [](const memory::desc& plain, const memory::desc& want) {
    return std::make_unique<Operand>(plain, want);
  };
  if (kind == kForward) {
    auto& pd = c.fwd_pd;
    pass->prim = dnnl::convolution_forward(pd);
    pass->a = op(c.src, pd.src_desc());
    pass->b = op(c.wei, pd.weights_desc());
    pass->out = op(c.dst, pd.dst_desc());
    pass->arg_a = DNNL_ARG_SRC, pass->arg_b = DNNL_ARG_WEIGHTS, pass->arg_out = DNNL_ARG_DST;
  } else if (kind == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, c.src, c.wei_any, c.dst, c.strides,
        c.dilation, c.pad_l, c.pad_r, c.fwd_pd);
    pass->prim = dnnl::convolution_backward_data(pd);
    pass->a = op(c.dst, pd.diff_dst_desc());
    pass->b = op(c.wei, pd.weights_desc());
    pass->out = op(c.src, pd.diff_src_desc());
    pass->arg_a = DNNL_ARG_DIFF_DST, pass->arg_b = DNNL_ARG_WEIGHTS;
    pass->arg_out = DNNL_ARG_DIFF_SRC;
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, c.src, c.wei_any, c.dst, c.strides,
        c.dilation, c.pad_l, c.pad_r, c.fwd_pd);
    pass->prim = dnnl::convolution_backward_weights(pd);
    pass->a = op(c.src, pd.src_desc());
    pass->b = op(c.dst, pd.diff_dst_desc());
    pass->out = op(c.wei, pd.diff_weights_desc());
    pass->arg_a = DNNL_ARG_SRC, pass->arg_b = DNNL_ARG_DIFF_DST;
    pass->arg_out = DNNL_ARG_DIFF_WEIGHTS;
  }
  return pass;
}

// The per-example sizes of a pass's two inputs and output, in floats (0: shared, not split).
std::array<int64_t, 3> ExampleSizes(const Geometry& g, Kind kind) {
  const Conv c(g);  // only for its descriptors' sizes
  const int64_t n = g[0];
  const int64_t x = c.src.get_size() / sizeof(float) / n, y = c.dst.get_size() / sizeof(float) / n;
  if (kind == kForward) return {x, 0, y};
  if (kind == kBackwardData) return {y, 0, x};
  return {x, y, 0};  // backward-weights: every chunk writes a partial kernel gradient
}

// Chunks of the batch, claimed by the calling thread and by tasks on XLA's thread pool, so a
// caller never waits on a chunk that nobody runs. Late tasks find nothing left and return.
struct Job {
  std::atomic<int> next{0}, done{0};
  std::mutex mu;
  std::string error;
};

extern "C" void omp_set_num_threads(int);

// Buffers: forward (x, w) -> y; backward-data (dy, w) -> dx; backward-weights (x, dy) -> dw.
// The batch is split into one chunk per thread of XLA's pool, each run by single-threaded
// oneDNN; the backward-weights chunks' partial gradients are summed at the end.
ffi::Error Execute(Kind kind, ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                   ffi::Result<ffi::AnyBuffer> out, ffi::Span<const int64_t> geometry) {
  if (geometry.size() != std::tuple_size<Geometry>::value) {
    return ffi::Error::InvalidArgument("onednn conv: geometry needs 15 integers");
  }
  Geometry g;
  for (size_t i = 0; i < g.size(); ++i) g[i] = geometry[i];
  const int64_t n = g[0];
  const int chunks = static_cast<int>(std::max<int64_t>(1, std::min(n, pool.num_threads())));
  const auto sizes = ExampleSizes(g, kind);
  const int64_t out_size = out->element_count();
  std::vector<std::vector<float>> partial(kind == kBackwardWeights ? chunks : 0);
  auto* pa = static_cast<float*>(a.untyped_data());
  auto* pb = static_cast<float*>(b.untyped_data());
  auto* po = static_cast<float*>(out->untyped_data());

  auto run = [&](int i) {
    const int64_t lo = n * i / chunks, hi = n * (i + 1) / chunks;
    Geometry part = g;
    part[0] = hi - lo;
    thread_local std::map<std::pair<Geometry, int>, std::unique_ptr<Pass>> passes;
    auto& pass = passes[{part, kind}];
    if (!pass) pass = MakePass(part, kind);
    float* dst = po + lo * sizes[2];
    if (kind == kBackwardWeights) {
      partial[i].resize(out_size);
      dst = partial[i].data();
    }
    pass->Run(pa + lo * sizes[0], pb + lo * sizes[1], dst);
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
  // Tasks outlive this call when they start late: they hold the job, never `run`.
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
  for (int i = 1; i < static_cast<int>(partial.size()); ++i) {
    for (int64_t k = 0; k < out_size; ++k) partial[0][k] += partial[i][k];
  }
  if (!partial.empty()) std::copy(partial[0].begin(), partial[0].end(), po);
  return ffi::Error::Success();
}

template <Kind kind>
ffi::Error Handle(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                  ffi::Result<ffi::AnyBuffer> out, ffi::Span<const int64_t> geometry) {
  return Execute(kind, pool, a, b, out, geometry);
}

}  // namespace

#define CNNJAX_CONV_HANDLER(symbol, kind)                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, Handle<kind>,                  \
                                ffi::Ffi::Bind()                       \
                                    .Ctx<ffi::ThreadPool>()            \
                                    .Arg<ffi::AnyBuffer>()             \
                                    .Arg<ffi::AnyBuffer>()             \
                                    .Ret<ffi::AnyBuffer>()             \
                                    .Attr<ffi::Span<const int64_t>>("geometry"));

CNNJAX_CONV_HANDLER(cnnjax_conv_forward, kForward)
CNNJAX_CONV_HANDLER(cnnjax_conv_backward_data, kBackwardData)
CNNJAX_CONV_HANDLER(cnnjax_conv_backward_weights, kBackwardWeights)

// The device-side tables of a call (NOTE [CUDA work decomposition] in kernel_args.h) and the cache
// that keeps them between steps.
//
// NOTE [CUDA workspace]
// A call's tables (one TensorMeta per tensor, the chunk prefix sums, the arrival counters, the
// fresh marks and the per-chunk partials) live in one device buffer, O(tensors + chunks) bytes:
// under 0.1% of the parameters, since a chunk holds thousands of elements. They depend only on the
// tensors' addresses, sizes and dtype, so they are built once and found again by that key on the
// next step: a training loop whose gradients keep their addresses (the caching allocator usually
// hands the same blocks back; a captured graph always does) uploads nothing after its first step.
// A new key builds its image in pinned host memory and copies it with one asynchronous copy on the
// call's stream: no host synchronisation. During a CUDA graph capture (whose gradients are new
// tensors, so new keys) the copy is made outside the graph instead, once, on a stream of its own:
// the tables are constant, so the captured kernels find them in place at every replay, and the
// capture needs neither a pinned allocation nor a copy node. Entries used while a graph was
// captured are kept for the life of the process. Other entries are dropped least recently used
// first, their pinned image only once its copy has completed (an event, queried, never waited on).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstring>
#include <list>
#include <vector>

#include "kernel_args.h"
#include "llaca/checks.h"

namespace llaca {
namespace cuda {

inline int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// Where each table sits in the workspace buffer, in bytes. Everything before `partials` is
// uploaded (the counters and marks as zeros); the partials are written before they are read.
struct WorkspaceLayout {
  int64_t n_tensors = 0, n_split = 0;
  int64_t metas = 0, chunk_begin = 0, split_tensors = 0, split_chunk_begin = 0, arrivals = 0,
          fresh = 0, partials = 0, upload_bytes = 0, total_bytes = 0;

  WorkspaceLayout() = default;
  WorkspaceLayout(int64_t tensors, int64_t split, int64_t chunks) : n_tensors(tensors), n_split(split) {
    int64_t at = 0;
    auto take = [&](int64_t bytes) {
      const int64_t start = at;
      at += align16(bytes);
      return start;
    };
    metas = take(n_tensors * int64_t(sizeof(TensorMeta)));
    chunk_begin = take((n_tensors + 1) * int64_t(sizeof(int64_t)));
    split_tensors = take(n_split * int64_t(sizeof(int32_t)));
    split_chunk_begin = take((n_split + 1) * int64_t(sizeof(int64_t)));
    arrivals = take(n_tensors * int64_t(sizeof(uint32_t)));
    fresh = take(n_tensors);
    upload_bytes = at;
    partials = take(3 * chunks * int64_t(sizeof(float)));
    total_bytes = at;
  }
};

// The identity of a call's tables: device, dtype, and per tensor its size and the address of
// each role (llaca/roles.h order; 0 for a role the call does not use or leaves empty). Written
// into `key`, which the caller reuses from step to step (no host allocation once warm).
inline void workspace_key(const Lists& l, bool adamw, bool amsgrad, bool llaca,
                          std::vector<int64_t>& key) {
  const int64_t n = static_cast<int64_t>(l.params.size());
  key.clear();
  key.push_back(n);
  key.push_back(n ? l.params[0].get_device() : -1);
  key.push_back(n ? static_cast<int64_t>(l.params[0].scalar_type()) : -1);
  const RolesInUse roles(l, adamw, amsgrad, llaca);
  for (int64_t i = 0; i < n; ++i) {
    key.push_back(l.params[i].numel());
    for (int r = 0; r < kRoleCount; ++r) key.push_back(roles.address(r, i));
  }
}

// The host image of the uploaded part of the workspace, built from a key alone.
inline void build_image(const std::vector<int64_t>& key, int64_t chunk_elems, uint8_t* image,
                        WorkspaceLayout& layout, CallShape& shape) {
  const int64_t n = key[0];
  const int64_t* rows = key.data() + 3;
  std::vector<TensorMeta> metas(n);
  std::vector<int64_t> chunk_begin(n + 1, 0), split_chunk_begin(1, 0);
  std::vector<int32_t> split_tensors;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* row = rows + i * (kRoleCount + 1);  // numel, then an address per role
    const int64_t numel = row[0];
    const int64_t chunks = numel == 0 ? 1 : (numel + chunk_elems - 1) / chunk_elems;
    TORCH_CHECK(chunks < (int64_t(1) << 31), "llaca_optim: params[", i, "] has ", numel,
                " elements, more chunks than a launch can index");
    TensorMeta& m = metas[i];
    bool aligned = true;
    for (int r = 0; r < kRoleCount; ++r) {
      m.set(r, row[1 + r]);
      if (is_array(kRoleInfo[r].kind)) aligned = aligned && row[1 + r] % kVecBytes == 0;
    }
    m.numel = numel;
    m.num_chunks = static_cast<int32_t>(chunks);
    m.vectorized = aligned;
    chunk_begin[i + 1] = chunk_begin[i] + chunks;
    if (chunks > 1) {
      split_tensors.push_back(static_cast<int32_t>(i));
      split_chunk_begin.push_back(split_chunk_begin.back() + chunks);
    }
  }
  const int64_t n_split = static_cast<int64_t>(split_tensors.size());
  layout = WorkspaceLayout(n, n_split, chunk_begin[n]);
  std::memset(image, 0, layout.upload_bytes);
  // An empty vector's data() may be null, and memcpy from null is undefined even for zero bytes
  // (UBSan's finding in tests/toolchain/test_sanitizers.py: a call with no split tensor).
  auto put = [image](int64_t offset, const void* source, size_t bytes) {
    if (bytes > 0) std::memcpy(image + offset, source, bytes);
  };
  put(layout.metas, metas.data(), n * sizeof(TensorMeta));
  put(layout.chunk_begin, chunk_begin.data(), (n + 1) * sizeof(int64_t));
  put(layout.split_tensors, split_tensors.data(), n_split * sizeof(int32_t));
  put(layout.split_chunk_begin, split_chunk_begin.data(), (n_split + 1) * sizeof(int64_t));
  shape.chunks = chunk_begin[n];
  shape.split_chunks = split_chunk_begin.back();
}

// Runtime: the GPU (ops_cuda.cpp) or the tests' emulation (tests/cuda_sim/). It provides
//   using Stream; using Event;
//   static at::Tensor host_buffer(int64_t bytes, bool capturing);   pinned where it matters
//   static void upload(const at::Tensor& host, at::Tensor& device, int64_t bytes, Stream,
//                      bool capturing);                             see NOTE [CUDA workspace]
//   static Event record(Stream); static bool done(Event&); static void destroy(Event&);
template <typename Runtime>
class WorkspaceCache {
 public:
  struct Entry {
    std::vector<int64_t> key;
    uint64_t hash = 0;
    at::Tensor host;    // the uploaded image; immutable once built
    at::Tensor device;  // the workspace buffer
    WorkspaceLayout layout;
    CallShape shape;
    typename Runtime::Event uploaded{};
    bool graph = false;  // used during a CUDA graph capture: kept for good
  };

  explicit WorkspaceCache(size_t capacity) : capacity_(capacity) {}
  WorkspaceCache(const WorkspaceCache&) = delete;
  WorkspaceCache& operator=(const WorkspaceCache&) = delete;
  ~WorkspaceCache() {
    // At process exit the CUDA runtime may already be gone: events are leaked, not destroyed.
  }

  // The entry for `key`, most recently used first; built and uploaded on a miss.
  Entry& get(const std::vector<int64_t>& key, int64_t chunk_elems, const c10::Device& device,
             typename Runtime::Stream stream, bool capturing) {
    // Querying events is not allowed while a stream captures (torch's caching allocator defers
    // its own queries then too): retired entries wait for the next ordinary step.
    if (!capturing) reap_retired();
    const uint64_t hash = fnv1a(key);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->hash == hash && it->key == key) {
        entries_.splice(entries_.begin(), entries_, it);
        entries_.front().graph = entries_.front().graph || capturing;
        return entries_.front();
      }
    }
    Entry entry;
    entry.key = key;
    entry.hash = hash;
    // The image is built straight into the host buffer, sized by a first pass over the key.
    const int64_t n = entry.key[0];
    WorkspaceLayout bound(n, n, 1);  // upper bound of the uploaded bytes: every tensor split
    entry.host = Runtime::host_buffer(bound.upload_bytes, capturing);
    build_image(entry.key, chunk_elems, static_cast<uint8_t*>(entry.host.data_ptr()), entry.layout,
                entry.shape);
    entry.device = at::empty({entry.layout.total_bytes},
                             at::TensorOptions().dtype(at::kByte).device(device));
    Runtime::upload(entry.host, entry.device, entry.layout.upload_bytes, stream, capturing);
    if (!capturing) entry.uploaded = Runtime::record(stream);
    entry.graph = capturing;
    entries_.push_front(std::move(entry));
    evict();
    return entries_.front();
  }

 private:
  static uint64_t fnv1a(const std::vector<int64_t>& key) {
    uint64_t h = 1469598103934665603ull;
    for (int64_t v : key) {
      h ^= static_cast<uint64_t>(v);
      h *= 1099511628211ull;
    }
    return h;
  }

  void evict() {
    size_t evictable = 0;
    for (const Entry& e : entries_) evictable += !e.graph;
    for (auto it = entries_.end(); evictable > capacity_ && it != entries_.begin();) {
      --it;
      if (it->graph) continue;
      retired_.push_back(std::move(*it));
      it = entries_.erase(it);
      --evictable;
    }
  }

  // Frees retired entries whose upload has completed (their device buffers are stream-ordered by
  // the caching allocator; only the pinned image must outlive its copy).
  void reap_retired() {
    for (auto it = retired_.begin(); it != retired_.end();) {
      if (Runtime::done(it->uploaded)) {
        Runtime::destroy(it->uploaded);
        it = retired_.erase(it);
      } else {
        ++it;
      }
    }
  }

  size_t capacity_;
  std::list<Entry> entries_;
  std::list<Entry> retired_;
};

// Points a call's StepArgs at the tables in an entry's workspace buffer.
inline void point_at_workspace(StepArgs& args, uint8_t* base, const WorkspaceLayout& layout) {
  args.metas = reinterpret_cast<const TensorMeta*>(base + layout.metas);
  args.chunk_begin = reinterpret_cast<const int64_t*>(base + layout.chunk_begin);
  args.n_tensors = static_cast<int32_t>(layout.n_tensors);
  args.n_split = static_cast<int32_t>(layout.n_split);
  args.split_tensors = reinterpret_cast<const int32_t*>(base + layout.split_tensors);
  args.split_chunk_begin = reinterpret_cast<const int64_t*>(base + layout.split_chunk_begin);
  args.arrivals = reinterpret_cast<uint32_t*>(base + layout.arrivals);
  args.fresh = base + layout.fresh;
  args.partials = reinterpret_cast<float*>(base + layout.partials);
}

}  // namespace cuda
}  // namespace llaca

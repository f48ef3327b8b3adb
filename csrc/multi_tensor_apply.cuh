// Multi-tensor apply: one kernel launch covers many tensors. Every tensor is cut into chunks of `chunk` elements; a
// launch's metadata (tensor addresses, sizes, and which tensor and chunk each block takes) travels in the kernel
// arguments, so there is no host-to-device copy and no allocation. A launch is issued whenever the metadata is full
// (kMaxTensors tensors or kMaxBlocks blocks); a tensor cut by a full launch continues in the next one.
//
// Size budget: kernel arguments are limited to 4 KiB (the portable limit); the metadata stays under ~3.8 KiB so that a
// functor may add ~200 bytes of its own arguments.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <vector>

namespace fasttrain {

constexpr int kMtaMaxBlocks = 320;
constexpr int kMtaMetaBytes = 2200;  // for addresses, sizes and aux pointers; the block table takes 1600 more

template <int DEPTH>
struct TensorListMeta {
  static constexpr int kMaxTensors = kMtaMetaBytes / ((DEPTH + 2) * 8);  // DEPTH 1: 91, 4: 45, 5: 39
  static constexpr int kMaxBlocks = kMtaMaxBlocks;
  void* addresses[DEPTH][kMaxTensors];
  int64_t sizes[kMaxTensors];
  void* aux[kMaxTensors];  // one per-tensor pointer for the functor (AdamW: the tensor's step count)
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
  int block_offset;  // index of this launch's block 0 among all blocks of the call (for per-block outputs)
};
static_assert(sizeof(TensorListMeta<5>) <= 3900, "TensorListMeta must leave room in the 4 KiB kernel arguments");
static_assert(sizeof(TensorListMeta<1>) <= 3900, "TensorListMeta must leave room in the 4 KiB kernel arguments");
static_assert(TensorListMeta<1>::kMaxTensors <= 256, "block_to_tensor is one byte");

// Total blocks a multi_tensor_apply over these tensors will launch (for sizing per-block outputs).
inline int64_t mta_total_blocks(at::TensorList tensors, int64_t chunk) {
  int64_t blocks = 0;
  for (const auto& t : tensors) blocks += (t.numel() + chunk - 1) / chunk;
  return blocks;
}

// lists[d][t] is tensor t of list d (all lists as long as lists[0], tensor t of every list has the same numel);
// aux is empty or holds one pointer per tensor. launch(meta, n_blocks) issues one kernel over meta's first n_blocks.
template <int DEPTH, typename Launch>
void multi_tensor_apply(const std::array<at::TensorList, DEPTH>& lists, const std::vector<void*>& aux, int64_t chunk,
                        Launch&& launch) {
  using Meta = TensorListMeta<DEPTH>;
  const int64_t n_tensors = static_cast<int64_t>(lists[0].size());
  TORCH_CHECK(aux.empty() || static_cast<int64_t>(aux.size()) == n_tensors, "multi_tensor_apply: aux size mismatch");
  TORCH_CHECK(chunk > 0 && chunk <= (int64_t{1} << 30), "multi_tensor_apply: bad chunk size ", chunk);
  Meta meta;
  meta.block_offset = 0;
  int n_blocks = 0;
  int n_slots = 0;  // tensors placed in meta
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t numel = lists[0][t].numel();
    if (numel == 0) continue;
    int slot = n_slots;
    for (int d = 0; d < DEPTH; ++d) meta.addresses[d][slot] = lists[d][t].data_ptr();
    meta.sizes[slot] = numel;
    meta.aux[slot] = aux.empty() ? nullptr : aux[t];
    const int64_t n_chunks = (numel + chunk - 1) / chunk;
    TORCH_CHECK(n_chunks <= INT32_MAX, "multi_tensor_apply: tensor too large for the chunk table");
    for (int64_t c = 0; c < n_chunks; ++c) {
      meta.block_to_tensor[n_blocks] = static_cast<unsigned char>(slot);
      meta.block_to_chunk[n_blocks] = static_cast<int>(c);
      ++n_blocks;
      const bool last_chunk = c == n_chunks - 1;
      if (n_blocks == Meta::kMaxBlocks || (last_chunk && slot + 1 == Meta::kMaxTensors)) {
        launch(meta, n_blocks);
        meta.block_offset += n_blocks;
        n_blocks = 0;
        if (last_chunk) {
          slot = -1;  // the next tensor starts at slot 0
        } else {      // this tensor continues in the next launch, from slot 0
          for (int d = 0; d < DEPTH; ++d) meta.addresses[d][0] = meta.addresses[d][slot];
          meta.sizes[0] = meta.sizes[slot];
          meta.aux[0] = meta.aux[slot];
          slot = 0;
        }
      }
    }
    n_slots = slot + 1;
  }
  if (n_blocks > 0) launch(meta, n_blocks);
}

}  // namespace fasttrain

// to_plain_layout (declared in binding.h). A translation unit of its own because
// phi/core/dense_tensor.h needs cuBLAS headers when PADDLE_WITH_CUDA is defined; oneDNN
// tensors only exist on CPU, so this file is always compiled without CUDA.
#include "binding.h"
#include "paddle/phi/core/dense_tensor.h"

// Exported by libphi_core.so; declared here because its header needs oneDNN's headers.
namespace phi {
namespace funcs {
void TransDataLayoutFromOneDNN(common::DataLayout in_layout, common::DataLayout out_layout,
                               const phi::DenseTensor& in, phi::DenseTensor* out,
                               phi::Place place, bool always_copy);
}  // namespace funcs
}  // namespace phi

namespace dpn_fast {

paddle::Tensor to_plain_layout(const paddle::Tensor& t) {
  if (t.layout() != phi::DataLayout::ONEDNN) return t;
  auto plain = std::make_shared<phi::DenseTensor>();
  phi::funcs::TransDataLayoutFromOneDNN(phi::DataLayout::ONEDNN, phi::DataLayout::NCHW,
                                        *std::static_pointer_cast<phi::DenseTensor>(t.impl()),
                                        plain.get(), t.place(), /*always_copy=*/true);
  return paddle::Tensor(plain);
}

}  // namespace dpn_fast

// The Python module of scaletrain's CPU kernels (built by kernels/build.py).
#include <torch/extension.h>

#include <ATen/native/CPUBlas.h>

std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          double scale, const c10::optional<at::Tensor>& cos,
                                          const c10::optional<at::Tensor>& sin);
std::vector<at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                           double scale, const c10::optional<at::Tensor>& cos,
                                           const c10::optional<at::Tensor>& sin);
at::Tensor pack_panels(const at::Tensor& x, bool onednn);
at::Tensor softmax_cross_entropy_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& weight);
at::Tensor swiglu_forward(const at::Tensor& g, const at::Tensor& u);
std::vector<at::Tensor> swiglu_backward(const at::Tensor& dh, const at::Tensor& g, const at::Tensor& u);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_forward", &attention_forward, "causal attention forward, bf16 or fp32 (brgemm): out, lse",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("cos") = py::none(),
        py::arg("sin") = py::none());
  m.def("attention_backward", &attention_backward, "causal attention backward, bf16 or fp32 (brgemm)",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("scale"),
        py::arg("cos") = py::none(), py::arg("sin") = py::none());
  m.def("pack_panels", &pack_panels, "for tests: a bf16 [k, n] matrix in the kernel's VNNI panel layout");
  m.def("softmax_cross_entropy_", &softmax_cross_entropy_, "row-wise softmax CE loss; logits become its gradient");
  m.def("swiglu_forward", &swiglu_forward, "silu(g) * u, bf16 or fp32");
  m.def("swiglu_backward", &swiglu_backward, "gradients of silu(g) * u w.r.t. g and u: dg, du");
  m.def("amx_available", [] { return at::native::cpublas::could_pack(at::kBFloat16); },
        "whether PyTorch's brgemm uses AMX bf16 here");
}

"""The CPU kernels: TVMScript written for one vector unit (register tiles, chunked loops), one
module per family of forms; lowering/forms/ says which form calls which."""

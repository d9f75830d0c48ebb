"""pytest plugin (-p compat_5_16_tests): lets transformers' 5.16.0.dev0 test tree import against the installed 5.24.0.

Only fills names that the 5.16-dev tests import and 5.24 removed/moved; it changes no behaviour of any model.
"""

import transformers.integrations.tensor_parallel as _tp

if not hasattr(_tp, "_get_parameter_tp_plan"):
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    def _get_parameter_tp_plan(parameter_name, tp_plan, is_weight=True):
        # verbatim logic of transformers 5.16.0.dev0 (integrations/tensor_parallel.py)
        generic_param_name = replace_layer_number_by_wildcard(parameter_name)
        if generic_param_name in tp_plan:
            return tp_plan[generic_param_name]
        elif is_weight and "." in generic_param_name and (module_name := generic_param_name.rsplit(".", 1)[0]) in tp_plan:
            return tp_plan[module_name]
        return None

    _tp._get_parameter_tp_plan = _get_parameter_tp_plan

# 5.16 PreTrainedConfig had a class attribute `has_no_defaults_at_init: ClassVar[bool] = False` (True only for
# encoder-decoder/RAG/musicgen configs); 5.24 dropped it and ConfigTester.check_config_can_be_init_without_params reads
# it. Restore the 5.16 default on the base class so test_config runs its remaining checks.
from transformers.configuration_utils import PreTrainedConfig as _PreTrainedConfig

if not hasattr(_PreTrainedConfig, "has_no_defaults_at_init"):
    _PreTrainedConfig.has_no_defaults_at_init = False

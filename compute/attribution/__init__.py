"""Attribution: the spliced model, node effects (IG, AtP, exact patching), edges, discovery, faithfulness
and editing."""

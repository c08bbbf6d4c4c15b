"""The hooks the flow-matching transformer pipelines (SD3, Flux) share."""

from __future__ import annotations

from diffusers.utils.torch_utils import get_module_execution_device

from dng.pipelines.common import DNGPipelineMixin


class FlowDNGPipelineMixin(DNGPipelineMixin):
    """A DNG pipeline on a flow-matching transformer: the parent's default size, joint-attention kwargs, T5's sequence
    length, and latents decoded with the VAE's shift."""

    def _dng_prepare(self, args: dict) -> dict:
        attention = args["joint_attention_kwargs"]
        # The parent's properties (guidance_scale, joint_attention_kwargs) read these.
        self._guidance_scale, self._joint_attention_kwargs = args["guidance_scale"], attention
        return dict(lora_scale=(attention or {}).get("scale"), max_sequence_length=args["max_sequence_length"])

    def _dng_default_size(self) -> tuple[int, int]:
        size = self.default_sample_size * self.vae_scale_factor
        return size, size

    def _dng_unpack(self, latents, height: int, width: int):
        """Latents in the denoiser's layout back to [images, channels, height, width]: as they are."""
        return latents

    def _dng_decode(self, latents, args: dict) -> dict:
        """Latents to images as the parent decodes them (latent output in the denoiser's layout, as the parent's)."""
        output_type = args["output_type"]
        if output_type == "latent":
            return {"images": latents}
        latents = self._dng_unpack(latents, args["height"], args["width"])
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(latents.to(get_module_execution_device(self.vae)), return_dict=False)[0]
        return {"images": self.image_processor.postprocess(image, output_type=output_type)}

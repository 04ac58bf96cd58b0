/// Defines `get_ref`, `get_mut` and `into_inner` on a service whose inner service is the field
/// `inner`, as every sturdy service has.
///
/// ```
/// struct Wrapper<S> {
///     inner: S,
/// }
/// sturdy_core::define_inner_service_accessors!(Wrapper<S>);
///
/// let w = Wrapper { inner: 5 };
/// assert_eq!(*w.get_ref(), 5);
/// ```
#[macro_export]
macro_rules! define_inner_service_accessors {
    ($name:ident < S $(, $param:ident)* >) => {
        impl<S $(, $param)*> $name<S $(, $param)*> {
            /// The inner service.
            pub fn get_ref(&self) -> &S {
                &self.inner
            }

            /// The inner service, mutably.
            pub fn get_mut(&mut self) -> &mut S {
                &mut self.inner
            }

            /// Unwraps the inner service.
            pub fn into_inner(self) -> S {
                self.inner
            }
        }
    };
}
